//! Reading a paginated list (see [`page`](crate::page)) through a driver
//! client: the first page, then each `next` link as the service gave it.

use std::{fmt, marker::PhantomData, sync::Arc};

use serde::de::DeserializeOwned;

use super::{Calls, ClientError};
use crate::page::{LIMIT, Page};

/// The pages of one list, read one at a time with [`next`](Self::next), or
/// all at once with [`all`](Self::all). Made by [`Calls::pages`].
///
/// Each `next` link is followed as the service wrote it, after checking
/// that it is a path of the same list: a link to another path or host
/// (or the page just read again) ends the iteration with
/// [`ClientError::Decode`] instead of being followed.
pub struct Pages<'a, T> {
    calls: Calls<'a>,
    /// The list's path, without its query: every link must stay on it.
    list: String,
    /// The next page's path and query; `None` once the last was read.
    next: Option<String>,
    _items: PhantomData<fn() -> T>,
}

// === impl Pages ===

impl<'a, T: DeserializeOwned> Pages<'a, T> {
    pub(super) fn new(calls: Calls<'a>, path: &str, limit: Option<u32>) -> Self {
        let list = path.split_once('?').map_or(path, |(p, _)| p).to_owned();
        let first = match limit {
            None => path.to_owned(),
            Some(n) => {
                let sep = if path.contains('?') { '&' } else { '?' };
                format!("{path}{sep}{LIMIT}={n}")
            }
        };
        Self {
            calls,
            list,
            next: Some(first),
            _items: PhantomData,
        }
    }

    /// The next page, or `None` after the last.
    ///
    /// # Errors
    ///
    /// A [`ClientError`] of the call (a 422 naming `cursor` when the
    /// position is no longer valid: start again), or
    /// [`ClientError::Decode`] for a `next` link that leaves the list.
    pub async fn next(&mut self) -> Result<Option<Page<T>>, ClientError> {
        let Some(path) = self.next.take() else {
            return Ok(None);
        };
        let page: Page<T> = self.calls.get_json(&path).await?;
        if let Some(next) = &page.next {
            let on_list = next
                .strip_prefix(self.list.as_str())
                .is_some_and(|rest| rest.starts_with('?'));
            if !on_list || *next == path {
                return Err(ClientError::Decode {
                    downstream: Arc::from(self.calls.downstream().name()),
                    message: format!("the next link of {} leaves the list", self.list),
                });
            }
        }
        self.next.clone_from(&page.next);
        Ok(Some(page))
    }

    /// Every item of every page that is left, in the list's order.
    ///
    /// # Errors
    ///
    /// The first error of [`next`](Self::next).
    pub async fn all(mut self) -> Result<Vec<T>, ClientError> {
        let mut items = Vec::new();
        while let Some(page) = self.next().await? {
            items.extend(page.items);
        }
        Ok(items)
    }
}

impl<T> fmt::Debug for Pages<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pages")
            .field("list", &self.list)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}
