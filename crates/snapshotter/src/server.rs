//! The gRPC server: containerd's snapshots service on a Unix socket, each
//! request run on a blocking thread under one mutex around the [`Engine`].

use std::{
    collections::HashMap,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use containerd_snapshots::{Info, Snapshotter, Usage, api::types::Mount, tonic};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use crate::{
    engine::Engine,
    error::{Error, Result},
    store::Kind,
};

/// Where `thinlayer serve containerd` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/thinlayer/containerd.sock";

/// containerd's `Snapshotter` over a thinlayer pool.
#[derive(Clone, Debug)]
pub struct Thinlayer {
    engine: Arc<Mutex<Engine>>,
}

impl Thinlayer {
    /// Wraps an opened engine.
    pub fn new(engine: Engine) -> Thinlayer {
        Thinlayer {
            engine: Arc::new(Mutex::new(engine)),
        }
    }

    /// Runs `f` on the engine on a blocking thread, one request at a time,
    /// logging how long it took.
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        key: String,
        f: impl FnOnce(&mut Engine) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let engine = self.engine.clone();
        let started = Instant::now();
        let key2 = key.clone();
        let out = tokio::task::spawn_blocking(move || {
            let mut e = engine.lock().unwrap_or_else(|p| p.into_inner());
            let waited = started.elapsed();
            (f(&mut e), waited)
        })
        .await
        .map_err(|e| Error::Transport(format!("request task failed: {e}")))?;
        let (result, waited) = out;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let waited_ms = waited.as_secs_f64() * 1000.0;
        match &result {
            Ok(_) if matches!(op, "stat" | "list") => {
                tracing::debug!(op, key = %key2, ms, waited_ms, "ok");
            }
            Ok(_) => tracing::info!(op, key = %key2, ms, waited_ms, "ok"),
            Err(e) => tracing::info!(op, key = %key2, ms, error = %e, "failed"),
        }
        result
    }
}

#[tonic::async_trait]
impl Snapshotter for Thinlayer {
    type Error = Error;

    async fn stat(&self, key: String) -> Result<Info> {
        self.run("stat", key.clone(), move |e| e.stat(&key)).await
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info> {
        self.run("update", info.name.clone(), move |e| {
            e.update(info, fieldpaths)
        })
        .await
    }

    async fn usage(&self, key: String) -> Result<Usage> {
        self.run("usage", key.clone(), move |e| e.usage(&key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>> {
        self.run("mounts", key.clone(), move |e| e.mounts(&key))
            .await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let spare_of = parent.clone();
        let warm = !parent.is_empty();
        let mounts = self
            .run("prepare", key.clone(), move |e| {
                e.create(&key, &parent, labels, Kind::Active)
            })
            .await?;
        if warm {
            // After the reply: the next Prepare on this parent finds a spare.
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || {
                engine
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .provision_spare(&spare_of);
            });
        }
        Ok(mounts)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.run("view", key.clone(), move |e| {
            e.create(&key, &parent, labels, Kind::View)
        })
        .await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        self.run("commit", key.clone(), move |e| {
            e.commit(&name, &key, labels)
        })
        .await
    }

    async fn remove(&self, key: String) -> Result<()> {
        self.run("remove", key.clone(), move |e| e.remove(&key))
            .await
    }

    async fn clear(&self) -> Result<()> {
        self.run("cleanup", String::new(), Engine::cleanup).await
    }

    type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<Info>>>;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<Self::InfoStream> {
        let infos = self
            .run("list", filters.join(" | "), move |e| e.list(&filters))
            .await?;
        Ok(tokio_stream::iter(
            infos.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }
}

/// Serves containerd's snapshots API for the pool under `root` on
/// `socket` until SIGTERM or SIGINT; then tears down the devices nothing
/// mounts and removes the socket.
///
/// A socket file left by a dead server is replaced; one a live server
/// answers on is an error, as is a second server on the same pool.
///
/// # Errors
/// [`Error::SocketInUse`], [`Error::AlreadyServing`], engine errors at
/// start (no pool, pool inactive, not root), I/O and server errors.
pub fn serve(root: &Path, socket: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the async runtime", e))?;
    rt.block_on(serve_async(root, socket))
}

async fn serve_async(root: &Path, socket: &Path) -> Result<()> {
    let started = Instant::now();
    // Signals first: a SIGTERM from the moment the socket exists is a
    // graceful stop, never the default (instant) death.
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("handle SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("handle SIGINT", e))?;
    // The socket first: a live server on it is the likelier mistake, and
    // its error is the clearer one.
    let listener = bind(socket)?;
    let engine = match Engine::open(root) {
        Ok(e) => e,
        Err(e) => {
            drop(listener);
            let _ = std::fs::remove_file(socket);
            return Err(e);
        }
    };
    let snapshotter = Arc::new(Thinlayer::new(engine));
    let engine = snapshotter.engine.clone();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    tracing::info!(
        socket = %socket.display(),
        root = %root.display(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "serving containerd snapshots"
    );
    let served = tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(snapshotter))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Transport(e.to_string()));
    let _ = std::fs::remove_file(socket);
    let _ = tokio::task::spawn_blocking(move || {
        engine.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    })
    .await;
    tracing::info!("stopped");
    served
}

/// Binds `socket`, replacing a stale socket file a dead server left.
fn bind(socket: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(Error::SocketInUse(socket.to_owned()));
            }
            tracing::info!(socket = %socket.display(), "removing a stale socket");
            std::fs::remove_file(socket)
                .map_err(|e| Error::io(format!("remove stale {}", socket.display()), e))?;
        }
        Ok(_) => {
            return Err(Error::InvalidArgument(format!(
                "{} exists and is not a socket; pass another --socket PATH",
                socket.display()
            )));
        }
        Err(_) => {}
    }
    tokio::net::UnixListener::bind(socket)
        .map_err(|e| Error::io(format!("bind {}", socket.display()), e))
}

/// The socket path: `path`, or [`DEFAULT_SOCKET`].
pub fn socket_or_default(path: Option<PathBuf>) -> PathBuf {
    path.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("thinlayer-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sock = dir.join("s.sock");
        let live = bind(&sock).unwrap();
        assert!(matches!(bind(&sock), Err(Error::SocketInUse(_))));
        drop(live);
        // The file stays behind, nobody answers: stale.
        assert!(sock.exists());
        let again = bind(&sock).unwrap();
        drop(again);
        std::fs::remove_file(&sock).unwrap();
        std::fs::write(&sock, b"x").unwrap();
        assert!(matches!(bind(&sock), Err(Error::InvalidArgument(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
