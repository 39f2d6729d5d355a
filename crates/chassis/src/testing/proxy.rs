//! A TCP proxy on loopback whose connections a test can cut and restore.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinSet},
};

/// A TCP proxy on `127.0.0.1` in front of a real server, for tests of what
/// a service does when its connection to a broker or a database drops:
/// [`cut`](Self::cut) closes every connection through it and refuses new
/// ones (each is accepted and closed at once, as a server going away
/// does), [`restore`](Self::restore) lets them through again. Stopped when
/// dropped.
///
/// ```
/// use chassis::testing::TcpProxy;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let target = server.local_addr().unwrap();
/// tokio::spawn(async move {
///     while let Ok((mut s, _)) = server.accept().await {
///         tokio::spawn(async move { s.write_all(b"hello").await });
///     }
/// });
/// let proxy = TcpProxy::start(target).await;
/// let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
/// let mut got = [0; 5];
/// s.read_exact(&mut got).await.unwrap();
/// assert_eq!(&got, b"hello");
///
/// proxy.cut();
/// let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
/// assert_eq!(s.read(&mut got).await.unwrap(), 0, "closed at once");
/// # }
/// ```
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

#[derive(Debug, Default)]
struct Shared {
    cut: AtomicBool,
    passed: AtomicU64,
    open: Mutex<JoinSet<()>>,
}

impl TcpProxy {
    /// Listens on a free loopback port, forwarding to `target`.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept(listener, target, shared.clone())).abort_handle();
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection through the proxy and refuses new ones until
    /// [`restore`](Self::restore).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .abort_all();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// How many connections have been let through so far: a client that
    /// reconnected after a [`restore`](Self::restore) shows here.
    pub fn connections(&self) -> u64 {
        self.shared.passed.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        if shared.cut.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        shared.passed.fetch_add(1, Ordering::SeqCst);
        let mut open = shared
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Finished connections leave the set here, so it holds the open ones.
        while open.try_join_next().is_some() {}
        open.spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}
