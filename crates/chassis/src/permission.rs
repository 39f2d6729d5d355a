//! Permission strings: what a route requires and what a caller is granted.
//!
//! # The standard
//!
//! Every API operation is guarded by exactly one **permission**, a string of
//! four segments `service:account:operation:object`:
//!
//! | segment | grammar | example | meaning |
//! |---|---|---|---|
//! | service | `[a-z][a-z0-9_-]{0,63}` | `ticketing` | the service that owns the operation |
//! | account | `[A-Za-z0-9_-]{1,64}`, or empty | `67000001` | the tenant the resource belongs to; empty when the operation is not per account |
//! | operation | `[a-z][a-z0-9_-]{0,63}` | `create` | a verb: `view`, `create`, `update`, `delete`, or a domain verb such as `reserve` |
//! | object | `[a-z][a-z0-9_-]{0,63}` | `ticket` | a noun, singular: the kind of resource |
//!
//! So `ticketing:67000001:create:ticket` lets its holder create tickets in
//! account 67000001, and `otto::view:deployment` lets its holder view
//! deployments, which belong to no account. Account ids are opaque and
//! case-sensitive: the chassis never normalises them, so the id that was
//! authorised is byte for byte the id the handler uses.
//!
//! A caller's **grants** (the `perms` claim of its token) use the same
//! grammar, plus two things:
//!
//! * `*` as a **whole** segment matches any value, including an empty
//!   account: `ticketing:*:view:*`, and `*:*:*:*` for a superuser. There are
//!   no partial globs (`tick*`), no `?`, no comma lists, and no prefix
//!   implication (a three-segment grant is not a grant).
//! * a leading `!` makes a grant a **deny**: `!ticketing:67000001:delete:*`.
//!
//! A token's grants are parsed failing closed: a grant outside the grammar
//! that contains a `!` anywhere (` !ticketing:1:delete:*`,
//! `!ticketing:1:delete`, `!!ticketing:1:delete:*`) may be a deny written
//! wrongly, and ignoring it could allow what it meant to deny, so it refuses
//! the whole token (401 `bad_claim_type`). Any other invalid grant is an
//! allow written wrongly; it is ignored (and logged), which only narrows
//! access.
//!
//! A request is allowed when some allow grant matches and no deny grant
//! does: **deny always wins**, and **no grant means deny**.
//!
//! Required permissions are only ever built from validated values: a route
//! declares a template such as `ticketing:{account}:create:ticket`, and the
//! chassis fills `{account}` from the path only after checking the value
//! against the account grammar. A path segment such as `*`, `%2A`,
//! `1%3Acreate`, `1,2` or an empty one is refused (404) before any
//! authorization, so a requirement can never contain a wildcard or shift its
//! segments.
//!
//! Matching compares segments one by one: linear in the number of segments,
//! no regular expressions, no allocation. Grants are indexed by service, so
//! a caller with many grants costs little more than one with a few.
//!
//! # Example
//!
//! ```
//! use chassis::permission::{AccountId, Decision, Grants, Permission};
//!
//! let grants = Grants::parse(["ticketing:67000001:*:*", "!ticketing:67000001:delete:*"]).unwrap();
//! let account = AccountId::parse("67000001").unwrap();
//! let create = Permission::new("ticketing", Some(&account), "create", "ticket").unwrap();
//! let delete = Permission::new("ticketing", Some(&account), "delete", "ticket").unwrap();
//! assert_eq!(grants.decide(&create), Decision::Allow);
//! assert!(!grants.decide(&delete).is_allowed());
//! assert_eq!(create.to_string(), "ticketing:67000001:create:ticket");
//!
//! // Values from the path are validated before they can become a requirement.
//! assert!(AccountId::parse("*").is_err());
//! assert!(AccountId::parse("1:create").is_err());
//! ```

use std::{collections::HashMap, fmt, str::FromStr, sync::Arc};

/// The longest segment.
pub const MAX_SEGMENT_LEN: usize = 64;
/// The most grants one caller may hold; a token with more is refused.
pub const MAX_GRANTS: usize = 4096;

/// `[a-z][a-z0-9_-]{0,63}`: service, operation and object segments.
pub fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_SEGMENT_LEN
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'))
}

/// `[A-Za-z0-9_-]{1,64}`: a non-empty account segment.
pub fn is_account(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_SEGMENT_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
}

/// Why a permission, grant, template or account id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PermissionError {
    /// Not exactly four `:`-separated segments.
    #[error("expected four segments `service:account:operation:object`")]
    Segments,
    /// A segment is outside its grammar.
    #[error("the {0} segment is not valid")]
    Segment(&'static str),
    /// A wildcard where only concrete values are allowed.
    #[error("a required permission cannot contain `*`")]
    Wildcard,
    /// An account id outside `[A-Za-z0-9_-]{1,64}`.
    #[error("not a valid account id")]
    Account,
    /// A template placeholder that is not a path parameter of the route.
    #[error("placeholder `{{{0}}}` is not a path parameter of the route")]
    UnknownParameter(String),
}

const SEGMENT_NAMES: [&str; 4] = ["service", "account", "operation", "object"];

/// A validated account id, from the path or from code.
///
/// The permission layer puts the account it authorised into the request;
/// handlers extract it (`account: AccountId`) instead of parsing the path
/// again, so the id in the database query is the id that was checked.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(Arc<str>);

impl AccountId {
    /// Validates `s` against `[A-Za-z0-9_-]{1,64}`.
    ///
    /// # Errors
    ///
    /// [`PermissionError::Account`] for anything else.
    pub fn parse(s: &str) -> Result<Self, PermissionError> {
        if is_account(s) {
            Ok(Self(s.into()))
        } else {
            Err(PermissionError::Account)
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for AccountId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Splits `s` into exactly four segments.
fn four(s: &str) -> Result<[&str; 4], PermissionError> {
    let mut it = s.split(':');
    let segs = [it.next(), it.next(), it.next(), it.next()];
    match (segs, it.next()) {
        ([Some(a), Some(b), Some(c), Some(d)], None) => Ok([a, b, c, d]),
        _ => Err(PermissionError::Segments),
    }
}

/// Offsets of the three `:` in a validated four-segment string.
fn colons(s: &str) -> [u16; 3] {
    let mut out = [0u16; 3];
    let mut n = 0;
    for (i, b) in s.bytes().enumerate() {
        if b == b':' && n < 3 {
            out[n] = i as u16;
            n += 1;
        }
    }
    out
}

fn segment<'a>(text: &'a str, colons: &[u16; 3], i: usize) -> &'a str {
    let start = if i == 0 {
        0
    } else {
        usize::from(colons[i - 1]) + 1
    };
    let end = if i == 3 {
        text.len()
    } else {
        usize::from(colons[i])
    };
    &text[start..end]
}

/// A concrete, required permission: no wildcard, every segment validated.
///
/// Cloning is cheap (a reference count).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Permission {
    text: Arc<str>,
    colons: [u16; 3],
}

impl Permission {
    /// `service:account:operation:object`; `account` is `None` for operations
    /// that are not per account.
    ///
    /// # Errors
    ///
    /// If a segment is outside its grammar.
    pub fn new(
        service: &str,
        account: Option<&AccountId>,
        operation: &str,
        object: &str,
    ) -> Result<Self, PermissionError> {
        for (name, value) in [
            ("service", service),
            ("operation", operation),
            ("object", object),
        ] {
            if !is_name(value) {
                return Err(PermissionError::Segment(name));
            }
        }
        Ok(Self::from_valid(service, account, operation, object))
    }

    /// Joins segments already validated (by [`Permission::new`] or a
    /// template's fill). On the request path: one allocation, no formatting
    /// machinery.
    fn from_valid(
        service: &str,
        account: Option<&AccountId>,
        operation: &str,
        object: &str,
    ) -> Self {
        let account = account.map_or("", AccountId::as_str);
        let mut text = String::with_capacity(
            service.len() + account.len() + operation.len() + object.len() + 3,
        );
        let mut colons = [0u16; 3];
        for (i, part) in [service, account, operation].into_iter().enumerate() {
            text.push_str(part);
            // Segments are at most MAX_SEGMENT_LEN bytes: far below u16::MAX.
            colons[i] = text.len() as u16;
            text.push(':');
        }
        text.push_str(object);
        Self {
            text: text.into(),
            colons,
        }
    }

    /// The segment `i` (0 service, 1 account, 2 operation, 3 object).
    pub fn segment(&self, i: usize) -> &str {
        segment(&self.text, &self.colons, i)
    }

    /// The service segment.
    pub fn service(&self) -> &str {
        self.segment(0)
    }

    /// The whole string.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Permission {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let [service, account, operation, object] = four(s)?;
        if [service, account, operation, object].contains(&"*") {
            return Err(PermissionError::Wildcard);
        }
        let account = if account.is_empty() {
            None
        } else {
            Some(AccountId::parse(account).map_err(|_| PermissionError::Segment("account"))?)
        };
        Self::new(service, account.as_ref(), operation, object)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permission({})", self.text)
    }
}

impl serde::Serialize for Permission {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// One grant: a permission pattern that may hold `*` segments, and may deny.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Grant {
    deny: bool,
    text: Box<str>,
    colons: [u16; 3],
}

impl Grant {
    /// Whether this grant denies.
    pub fn is_deny(&self) -> bool {
        self.deny
    }

    /// The segment `i`, possibly `*`.
    pub fn segment(&self, i: usize) -> &str {
        segment(&self.text, &self.colons, i)
    }

    /// Whether the grant covers `p`: every segment is `*` or equal.
    #[inline]
    pub fn matches(&self, p: &Permission) -> bool {
        (0..4).all(|i| {
            let g = self.segment(i);
            g == "*" || g == p.segment(i)
        })
    }
}

impl FromStr for Grant {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (deny, body) = match s.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let segs = four(body)?;
        for (i, seg) in segs.iter().enumerate() {
            let ok = *seg == "*"
                || if i == 1 {
                    seg.is_empty() || is_account(seg)
                } else {
                    is_name(seg)
                };
            if !ok {
                return Err(PermissionError::Segment(SEGMENT_NAMES[i]));
            }
        }
        Ok(Self {
            deny,
            text: body.into(),
            colons: colons(body),
        })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.deny {
            f.write_str("!")?;
        }
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Grant({self})")
    }
}

/// The outcome of an authorization decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// An allow grant matched and no deny grant did.
    Allow,
    /// A deny grant matched.
    DeniedExplicitly,
    /// No grant matched.
    NoGrant,
}

impl Decision {
    /// Whether access is allowed.
    pub fn is_allowed(self) -> bool {
        self == Self::Allow
    }
}

/// A caller's grants, indexed by service.
#[derive(Clone, Default)]
pub struct Grants {
    // Service names are short and come from verified tokens; a fast hasher
    // keeps a decision well under 100 ns.
    by_service: HashMap<Box<str>, Bucket, foldhash::fast::FixedState>,
    any_service: Bucket,
    len: usize,
}

#[derive(Clone, Default)]
struct Bucket {
    allow: Vec<Grant>,
    deny: Vec<Grant>,
}

impl Bucket {
    fn push(&mut self, g: Grant) {
        if g.deny {
            self.deny.push(g)
        } else {
            self.allow.push(g)
        }
    }
}

impl fmt::Debug for Grants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Why a set of grants was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantsError {
    /// More than [`MAX_GRANTS`].
    #[error("more than {MAX_GRANTS} grants")]
    TooMany,
    /// A grant outside the grammar that contains a `!`, so may have been
    /// meant as a deny: ignoring it could allow what it meant to deny, so
    /// the whole set is refused.
    #[error("deny grant #{index} is not valid: {error}")]
    InvalidDeny {
        /// Its position.
        index: usize,
        /// What is wrong.
        error: PermissionError,
    },
}

impl Grants {
    /// Parses grants strictly: any invalid grant is an error.
    ///
    /// # Errors
    ///
    /// The first invalid grant, or too many.
    pub fn parse<'a>(grants: impl IntoIterator<Item = &'a str>) -> Result<Self, PermissionError> {
        let mut out = Self::default();
        for g in grants {
            out.insert(g.parse()?);
        }
        Ok(out)
    }

    /// Parses grants from a token. An invalid grant that contains a `!`
    /// anywhere (a deny written wrongly: a leading space, three segments, a
    /// doubled `!`) refuses the whole set, since dropping it could widen
    /// access; any other invalid grant is an allow that is dropped and
    /// returned in the list of rejected grants (the caller logs them):
    /// dropping it only narrows access.
    ///
    /// # Errors
    ///
    /// An invalid grant containing `!`, or more than [`MAX_GRANTS`].
    pub fn from_claim<'a>(
        grants: impl IntoIterator<Item = &'a str>,
    ) -> Result<(Self, Vec<(usize, PermissionError)>), GrantsError> {
        let mut out = Self::default();
        let mut rejected = Vec::new();
        for (index, raw) in grants.into_iter().enumerate() {
            if index >= MAX_GRANTS {
                return Err(GrantsError::TooMany);
            }
            match raw.parse::<Grant>() {
                Ok(g) => out.insert(g),
                // Whatever holds a `!` may have been meant as a deny, even
                // one written wrongly (` !x:1:y:z`, `!x:1:y`, `!!x:1:y:z`):
                // fail closed.
                Err(error) if raw.contains('!') => {
                    return Err(GrantsError::InvalidDeny { index, error });
                }
                Err(error) => rejected.push((index, error)),
            }
        }
        Ok((out, rejected))
    }

    fn insert(&mut self, g: Grant) {
        self.len += 1;
        match g.segment(0) {
            "*" => self.any_service.push(g),
            service => self.by_service.entry(service.into()).or_default().push(g),
        }
    }

    /// The number of grants.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every grant, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.by_service
            .values()
            .chain(std::iter::once(&self.any_service))
            .flat_map(|b| b.deny.iter().chain(b.allow.iter()))
    }

    /// Decides whether `p` is allowed: deny wins, no grant means deny.
    pub fn decide(&self, p: &Permission) -> Decision {
        let bucket = self.by_service.get(p.service());
        let buckets = [bucket, Some(&self.any_service)];
        let denies = buckets.iter().flatten().flat_map(|b| b.deny.iter());
        if denies.into_iter().any(|g| g.matches(p)) {
            return Decision::DeniedExplicitly;
        }
        let mut allows = buckets.iter().flatten().flat_map(|b| b.allow.iter());
        if allows.any(|g| g.matches(p)) {
            Decision::Allow
        } else {
            Decision::NoGrant
        }
    }
}

/// One segment of a [`PermissionTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Box<str>),
    Param(Box<str>),
}

/// A route's required permission with placeholders filled from path
/// parameters, e.g. `ticketing:{account}:create:ticket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionTemplate {
    parts: [Part; 4],
    text: Box<str>,
}

impl PermissionTemplate {
    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Names of the path parameters it uses.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Param(name) => Some(&**name),
            Part::Literal(_) => None,
        })
    }

    /// Whether the account segment is a placeholder.
    pub fn has_account_param(&self) -> bool {
        matches!(self.parts[1], Part::Param(_))
    }

    /// The name of the account placeholder, when it is the only placeholder
    /// (`svc:{account}:op:object`): the permission is then a function of
    /// the account alone.
    pub(crate) fn only_account_param(&self) -> Option<&str> {
        match &self.parts {
            [
                Part::Literal(_),
                Part::Param(name),
                Part::Literal(_),
                Part::Literal(_),
            ] => Some(name),
            _ => None,
        }
    }

    /// Fills the placeholders from `params` (name, decoded value), validating
    /// each value against its segment's grammar. Returns the permission and,
    /// when the account came from the path, the validated account.
    ///
    /// # Errors
    ///
    /// The name of the first parameter that is missing or invalid.
    pub fn fill<'a>(
        &self,
        params: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<(Permission, Option<AccountId>), String> {
        let mut values: [&str; 4] = ["", "", "", ""];
        for (i, part) in self.parts.iter().enumerate() {
            values[i] = match part {
                Part::Literal(l) => l,
                Part::Param(name) => params(name).ok_or_else(|| name.to_string())?,
            };
        }
        let account = match (&self.parts[1], values[1]) {
            // An empty value from the path is refused like any invalid one.
            (Part::Param(name), v) => Some(AccountId::parse(v).map_err(|_| name.to_string())?),
            (Part::Literal(_), "") => None,
            (Part::Literal(_), v) => Some(AccountId::parse(v).map_err(|_| "account".to_owned())?),
        };
        for i in [0, 2, 3] {
            // Literals were validated when the template was parsed.
            if let Part::Param(name) = &self.parts[i]
                && !is_name(values[i])
            {
                return Err(name.to_string());
            }
        }
        let permission = Permission::from_valid(values[0], account.as_ref(), values[2], values[3]);
        let from_path = matches!(self.parts[1], Part::Param(_));
        Ok((permission, if from_path { account } else { None }))
    }
}

impl FromStr for PermissionTemplate {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let segs = four(s)?;
        let mut parts: [Part; 4] = std::array::from_fn(|_| Part::Literal("".into()));
        for (i, seg) in segs.iter().enumerate() {
            parts[i] = if let Some(name) = seg.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                let ok = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ok {
                    return Err(PermissionError::Segment(SEGMENT_NAMES[i]));
                }
                Part::Param(name.into())
            } else {
                if *seg == "*" {
                    return Err(PermissionError::Wildcard);
                }
                let ok = if i == 1 {
                    seg.is_empty() || is_account(seg)
                } else {
                    is_name(seg)
                };
                if !ok {
                    return Err(PermissionError::Segment(SEGMENT_NAMES[i]));
                }
                Part::Literal((*seg).into())
            };
        }
        Ok(Self {
            parts,
            text: s.into(),
        })
    }
}

impl fmt::Display for PermissionTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests;
