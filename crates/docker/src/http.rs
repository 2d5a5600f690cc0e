//! A small HTTP/1.1 server on a Unix socket for Docker's plugin protocol,
//! built to stay up whatever a client sends or withholds.
//!
//! Docker's plugin client POSTs a JSON body with a `Content-Length` and
//! reads a JSON answer, keeping the connection alive between calls. Every
//! connection is a task of its own (a thousand idle ones cost a thousand
//! small tasks, never a thread or the accept loop). Each endpoint takes
//! its body and gives its answer one of three ways ([`Route`], chosen by the
//! handler from the path):
//!
//! - [`Route::Json`]: the body read whole, a JSON answer (every call but
//!   two);
//! - [`Route::Upload`]: the body handed to the handler as a stream while
//!   it arrives, of any length, with a `Content-Length` or chunked (Go's
//!   client sends an `io.Reader` chunked): the graphdriver's `ApplyDiff`,
//!   whose body is a whole layer tar;
//! - [`Route::Download`]: a JSON body, an answer streamed chunked as the
//!   handler writes it (the graphdriver's `Diff`, a layer tar). An error
//!   before the first byte is an ordinary JSON answer; one after it breaks
//!   the connection off without the final chunk, so the client sees a
//!   truncated stream, never a short one that looks whole.
//!
//! Nothing is ever buffered whole but a JSON body. Bounds, each answered
//! with `{"Err": "..."}` and the HTTP status that names it before the
//! connection is closed:
//!
//! - the request head at most [`Limits::max_header`] bytes (431), a JSON
//!   body at most [`Limits::max_body`] (413, without reading it), no
//!   chunked bodies but uploads (411);
//! - [`Limits::idle`] without progress on a read or a write drops the
//!   connection, and a whole request (an upload's head) must arrive within
//!   [`Limits::request`] (408 if anything of it came);
//! - at most [`Limits::max_connections`] at once (more are closed at once);
//! - an `accept` error (`EMFILE`, `ENFILE`, ...) is logged and retried
//!   after a short pause: the server never stops accepting for it;
//! - a handler that panics answers 500; the server stays up.
//!
//! Requests are handed to the handler one at a time (an async mutex, then a
//! blocking thread): the pool's lock serialises them anyway. A streamed
//! request never holds the handler while its body flows: the handler
//! starts it ([`Handler::upload`], [`Handler::download`]) and hands back a
//! job that streams on a thread of its own, without the handler, and then
//! gives what it leaves to finish back to the handler ([`Finish`]), taken
//! again for that. Docker streams one layer's `Diff` answer straight into
//! another layer's `ApplyDiff` request: with the handler held across a
//! stream, the second waits for the first, which waits for the second to
//! read, for ever. A stream passes between the connection's task and its
//! job's thread through a small bounded channel, so a slow side slows the
//! other instead of filling memory.
//!
//! What must never happen: the handler (or any lock it takes) held while a
//! body or an answer streams; a streamed answer that looks complete before
//! its job's [`Finish`] ran (a client that saw the end may send the next
//! call at once, and it must find the stream's state settled).

use std::{
    future::Future,
    io::{self, Read, Write},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use thinlayer_pool::{
    load::CpuTicks,
    socket::{Access, accept_error_is_transient},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{Mutex, Notify, mpsc},
};

/// The bounds one connection lives within.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request line and headers, in bytes.
    pub max_header: usize,
    /// A JSON request body, in bytes (an upload's is unbounded).
    pub max_body: usize,
    /// Longest wait for any progress on a read or write.
    pub idle: Duration,
    /// Longest time one request (an upload's head) may take to arrive.
    pub request: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_header: 64 << 10,
            max_body: 1 << 20,
            idle: Duration::from_secs(10),
            request: Duration::from_secs(30),
            max_connections: 4096,
        }
    }
}

/// A handler's answer: an HTTP status and a JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// HTTP status (200 for Docker's answers, errors included in `Err`).
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: Value) -> Reply {
        Reply { status: 200, body }
    }

    /// `status` with `{"Err": msg}`.
    pub fn err(status: u16, msg: impl Into<String>) -> Reply {
        Reply {
            status,
            body: json!({"Err": msg.into()}),
        }
    }
}

/// How an endpoint takes its body and gives its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Body read whole (at most [`Limits::max_body`]), JSON answer:
    /// [`Handler::handle`].
    Json,
    /// Body streamed to [`Handler::upload`] as it arrives, JSON answer.
    Upload,
    /// Body read whole, the answer streamed by [`Handler::download`].
    Download,
}

/// What a streamed request's job leaves to do with the handler held again
/// once its stream has ended: settle the handler's state and give the
/// result.
pub type Finish<H, T> = Box<dyn FnOnce(&mut H) -> T + Send>;

/// The streaming part of a [`Route::Upload`] request: reads the body on a
/// thread of its own without the handler (an error from it is the
/// client's: broken off, truncated, too slow), then gives what finishes it,
/// whose [`Reply`] is the answer. What it leaves unread is discarded after
/// the answer is sent.
pub type Upload<H> = Box<dyn FnOnce(&mut dyn Read) -> Finish<H, Reply> + Send>;

/// The streaming part of a [`Route::Download`] request: writes the answer's
/// bytes on a thread of its own without the handler (a write error means
/// the client went away: stop), then gives what finishes it. The finish's
/// `Err` is sent as the answer if nothing was written yet; after, the
/// stream is broken off. The stream's end is sent after the finish ran.
pub type Download<H> = Box<dyn FnOnce(&mut dyn Write) -> Finish<H, Result<(), Reply>> + Send>;

/// What answers requests. `path` is the request target as sent, query
/// included (`/GraphDriver.ApplyDiff?id=...`). Runs on a blocking thread,
/// one request at a time; a streamed request's job runs without it.
pub trait Handler: Send + 'static {
    /// How the endpoint of `path` is served; [`Route::Json`] unless said.
    fn route(path: &str) -> Route
    where
        Self: Sized,
    {
        let _ = path;
        Route::Json
    }

    /// Answers one request whose body was read whole.
    fn handle(&mut self, path: &str, body: &[u8]) -> Reply;

    /// One step of work the answers left for later (a device to tear
    /// down, a removal's kernel work, a spare made ahead of demand), run
    /// between requests once they pause; says what is left. `busy`: other
    /// processes kept the machine's CPUs busy over the pause (more than
    /// [`BUSY`] of them), so work that only prepares for later requests
    /// may wait ([`Left::WhenQuiet`]). Errors are the handler's to log:
    /// the work stays for the next step or the next start.
    fn idle(&mut self, busy: bool) -> Left {
        let _ = busy;
        Left::Nothing
    }

    /// Whether an answer left work due at once (see [`Handler::urgent`]).
    fn has_urgent(&self) -> bool {
        false
    }

    /// One step of work an answer made due at once, for a request likely
    /// to follow (a container layer's mount, which its next request asks
    /// for): run as soon as the request that made it ends, without waiting
    /// for requests to pause, so it overlaps the client's own work between
    /// its calls; returns whether more is left. Errors are the handler's
    /// to log: the request that needs the work does it then.
    fn urgent(&mut self) -> bool {
        false
    }

    /// Starts one [`Route::Upload`] request: checks it and takes what its
    /// stream needs, and returns the job that reads the body.
    ///
    /// # Errors
    /// The answer to send at once (the body is then discarded unread).
    fn upload(&mut self, path: &str) -> Result<Upload<Self>, Reply>
    where
        Self: Sized,
    {
        Err(Reply::err(404, format!("{path} takes no streamed body")))
    }

    /// Starts one [`Route::Download`] request whose body is `body`: checks
    /// it and takes what its stream needs, and returns the job that writes
    /// the answer.
    ///
    /// # Errors
    /// The answer to send instead of the stream.
    fn download(&mut self, path: &str, body: &[u8]) -> Result<Download<Self>, Reply>
    where
        Self: Sized,
    {
        let _ = body;
        Err(Reply::err(404, format!("{path} streams no answer")))
    }
}

/// The `Content-Type` of every JSON answer.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// The `Content-Type` of a streamed answer.
pub const STREAM_CONTENT_TYPE: &str = "application/octet-stream";

/// Bytes per chunk of a streamed answer, and per message between the
/// connection and the handler.
const CHUNK: usize = 64 << 10;

/// Chunks in flight between the connection and the handler, each way.
const IN_FLIGHT: usize = 8;

/// Accepts on `listener` until `shutdown` completes; each connection whose
/// peer `access` admits is served under `limits` by `handler`.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    access: Access,
    limits: Limits,
    handler: H,
    shutdown: impl Future<Output = ()>,
) {
    let handler = Served {
        handler: Arc::new(Mutex::new(handler)),
        activity: Arc::new(Activity::default()),
    };
    let settler = tokio::spawn(settle(handler.clone()));
    let open = Arc::new(AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors (a flood of connections) or a
                // connection that died in the backlog: never fatal.
                let pause = if accept_error_is_transient(&e) {
                    tracing::warn!(error = %e, "accept failed; pausing 100 ms, then accepting again");
                    Duration::from_millis(100)
                } else {
                    tracing::warn!(error = %e, "accept failed; accepting again");
                    Duration::from_millis(10)
                };
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if let Err(why) = access.admit(&stream) {
            tracing::warn!("connection refused: {why}");
            continue;
        }
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            tracing::warn!(
                max = limits.max_connections,
                "too many connections open; closing a new one"
            );
            continue;
        }
        let counted = Counted::new(&open);
        let handler = handler.clone();
        tokio::spawn(async move {
            let _counted = counted;
            connection(stream, &handler, &limits).await;
        });
    }
    // A step under way finishes on its thread; no new one starts.
    settler.abort();
}

/// Serves `make()`'s handler on `socket` until SIGTERM or SIGINT, to root
/// and the members of `access`'s group: the process a `thinlayer serve`
/// verb runs. A socket file left by a dead server is replaced; one a live
/// server answers on is not, nor is anything that is not a socket. `what`
/// names the protocol in the log.
///
/// # Errors
/// The socket is taken or cannot be bound (exit 4 for the conflicts);
/// `make`'s errors; the runtime or signal handlers cannot start.
pub fn serve_until_signal<H, E>(
    socket: &Path,
    access: &Access,
    limits: Limits,
    what: &str,
    make: impl FnOnce() -> Result<H, E>,
) -> Result<(), E>
where
    H: Handler,
    E: From<thinlayer_pool::Error>,
{
    let setup = |e: io::Error, doing: &str| thinlayer_pool::Error::Io {
        context: format!("{doing} for the {what} server"),
        source: e,
    };
    thinlayer_pool::socket::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| setup(e, "start the async runtime"))?;
    rt.block_on(async {
        // Signals first: a SIGTERM from the moment the socket exists is a
        // graceful stop.
        let shutdown = thinlayer_pool::socket::stop_signals()?;
        let (listener, file) = thinlayer_pool::socket::listen(socket, access)?;
        let handler = make()?;
        tracing::info!(socket = %socket.display(), "serving {what}");
        serve(listener, *access, limits, handler, shutdown).await;
        // No new client finds the socket while a request in flight ends.
        drop(file);
        Ok::<(), E>(())
    })?;
    // Dropping the runtime waits for a request still on its thread.
    drop(rt);
    tracing::info!("{what} server stopped");
    Ok(())
}

/// Counts a live connection for as long as it lives (panics included).
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(n: &Arc<AtomicUsize>) -> Counted {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(n))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a request's body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// `Content-Length` bytes (0 without the header).
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug, PartialEq)]
struct Head {
    path: String,
    framing: Framing,
    keep_alive: bool,
    /// Bytes of the head, blank line included.
    len: usize,
}

/// Why a request is refused before the handler sees it.
#[derive(Debug)]
enum Refusal {
    /// Answer, then close.
    Answer(Reply),
    /// Close without a word (the client went away, or never spoke).
    Close,
}

/// Serves one connection's requests until it closes or breaks a bound.
async fn connection<H: Handler>(mut stream: UnixStream, handler: &Served<H>, limits: &Limits) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let started = Instant::now();
        let head = match read_head(&mut stream, &mut buf, limits, started).await {
            Ok(h) => h,
            Err(refusal) => return refuse(&mut stream, refusal, limits).await,
        };
        let route = H::route(&head.path);
        if let Err(reply) = check_body(&head, route, limits) {
            return refuse(&mut stream, Refusal::Answer(reply), limits).await;
        }
        let keep_alive = match route {
            Route::Json | Route::Download => {
                let Framing::Length(n) = head.framing else {
                    unreachable!("check_body admits chunked bodies only for uploads")
                };
                let body = match read_exact_body(&mut stream, &mut buf, n, limits, started).await {
                    Ok(b) => b,
                    Err(refusal) => return refuse(&mut stream, refusal, limits).await,
                };
                if route == Route::Json {
                    let reply = run(handler, head.path, body).await;
                    write_reply(&mut stream, &reply, head.keep_alive, limits)
                        .await
                        .is_ok()
                        && head.keep_alive
                } else {
                    download(&mut stream, handler, head, body, limits).await
                }
            }
            Route::Upload => upload(&mut stream, &mut buf, handler, head, limits).await,
        };
        if !keep_alive {
            return;
        }
    }
}

/// Answers a refused request (if it deserves an answer); the connection
/// then closes.
async fn refuse(stream: &mut UnixStream, refusal: Refusal, limits: &Limits) {
    if let Refusal::Answer(reply) = refusal {
        tracing::info!(status = reply.status, reply = %reply.body, "request refused");
        let _ = write_reply(stream, &reply, false, limits).await;
    }
}

/// Runs the handler on a blocking thread, one request at a time; a panic
/// is a 500. Logs (debug) how long the request waited for the handler and
/// how long it took in all.
async fn run<H: Handler>(handler: &Served<H>, path: String, body: Vec<u8>) -> Reply {
    let started = Instant::now();
    let shown = path.clone();
    let (reply, waited) = locked(handler, move |h| {
        let waited = started.elapsed();
        (h.handle(&path, &body), waited)
    })
    .await
    .unwrap_or_else(|reply| (reply, Duration::ZERO));
    tracing::debug!(
        path = %shown,
        status = reply.status,
        waited_ms = waited.as_secs_f64() * 1000.0,
        ms = crate::ms_since(started),
        "answered"
    );
    reply
}

/// Runs `f` with the handler on a blocking thread, one at a time; a panic
/// is a 500.
async fn locked<H: Handler, T: Send + 'static>(
    handler: &Served<H>,
    f: impl FnOnce(&mut H) -> T + Send + 'static,
) -> Result<T, Reply> {
    let a = &handler.activity;
    a.started.fetch_add(1, Ordering::Relaxed);
    a.in_flight.fetch_add(1, Ordering::Relaxed);
    let mut guard = Arc::clone(&handler.handler).lock_owned().await;
    let activity = Arc::clone(a);
    let done = tokio::task::spawn_blocking(move || {
        let out = f(&mut guard);
        if guard.has_urgent() {
            activity.urgent.store(true, Ordering::Relaxed);
        }
        out
    })
    .await;
    a.in_flight.fetch_sub(1, Ordering::Relaxed);
    a.ended.notify_one();
    done.map_err(|e| panicked(&e))
}

/// The handler, shared by the connections and the settler, and what the
/// settler watches.
struct Served<H> {
    handler: Arc<Mutex<H>>,
    activity: Arc<Activity>,
}

impl<H> Clone for Served<H> {
    fn clone(&self) -> Self {
        Served {
            handler: Arc::clone(&self.handler),
            activity: Arc::clone(&self.activity),
        }
    }
}

/// What a step of [`Handler::idle`] work left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// Nothing: the settler waits for the next request's end.
    Nothing,
    /// More steps, run at once while no request comes.
    More,
    /// Only work that waits for a quieter machine: the settler looks
    /// again every [`RETRY`], while no request comes.
    WhenQuiet,
}

/// Requests started and running, a wake-up when one ends, and whether
/// one left work due at once.
#[derive(Default)]
struct Activity {
    started: AtomicU64,
    in_flight: AtomicUsize,
    ended: Notify,
    urgent: AtomicBool,
}

/// How long no request may have started before the settler runs the
/// handler's [`Handler::idle`] work: longer than dockerd's own gaps
/// between the requests of one `docker create` or `docker rm` (up to
/// 100-odd ms in the TCG guest), so its steps start after such an
/// operation, not in the middle of it (the containerd snapshotter's jobs
/// wait as long).
const SETTLE_AFTER: Duration = Duration::from_millis(250);

/// How often the settler looks for idle work when no request comes (work
/// that falls due with time: a kept mount or spare idle too long).
const RECHECK: Duration = Duration::from_secs(10);

/// How often the settler measures the machine again while its work waits
/// for a quieter one ([`Left::WhenQuiet`]).
const RETRY: Duration = Duration::from_millis(100);

/// The share of all CPUs' time that other processes may take over a
/// pause for it to count as quiet ([`Handler::idle`]'s `busy`). An idle
/// dockerd and containerd take a few percent; a container starting takes
/// most of a small machine.
pub const BUSY: f64 = 0.3;

/// Runs the handler's urgent work as soon as a request that made some
/// ends; then, once requests pause for [`SETTLE_AFTER`], its idle work,
/// step after step, until it says nothing is left (and again every
/// [`RECHECK`]) or a request comes. A request arriving meanwhile waits
/// for one step at most; the pause then counts again from its end.
///
/// The steps run back to back, not a pause apart: the work a burst of
/// requests leaves is done in one stretch soon after it, instead of
/// trickling into the caller's next commands. Each is told whether other
/// processes kept the machine busy over the pause (or, while its work
/// waits for a quieter machine, over the last [`RETRY`]): measured only
/// while the settler itself did nothing, so its own kernel work (loop
/// and journal threads) never counts as someone else's.
async fn settle<H: Handler>(served: Served<H>) {
    let a = &served.activity;
    loop {
        let _ = tokio::time::timeout(RECHECK, a.ended.notified()).await;
        loop {
            while a.urgent.swap(false, Ordering::Relaxed) {
                if step(&served, H::urgent, false).await {
                    a.urgent.store(true, Ordering::Relaxed);
                }
            }
            let seen = a.started.load(Ordering::Relaxed);
            let quiet = || {
                a.started.load(Ordering::Relaxed) == seen
                    && a.in_flight.load(Ordering::Relaxed) == 0
                    && !a.urgent.load(Ordering::Relaxed)
            };
            // A request ending meanwhile may have left urgent work: at once
            // to it, then the pause counts from there.
            let Some(busy) = paused(a, SETTLE_AFTER).await.filter(|_| quiet()) else {
                continue;
            };
            let mut left = idle_step(&served, busy).await;
            loop {
                match left {
                    Left::More if quiet() => left = idle_step(&served, busy).await,
                    Left::WhenQuiet if quiet() => match paused(a, RETRY).await {
                        Some(busy) if quiet() => left = idle_step(&served, busy).await,
                        _ => break,
                    },
                    _ => break,
                }
            }
            if left == Left::Nothing {
                break;
            }
        }
    }
}

/// Waits `pause` unless a request ends first (then `None`); returns
/// whether other processes kept the machine busy meanwhile.
async fn paused(a: &Activity, pause: Duration) -> Option<bool> {
    let before = CpuTicks::now();
    if tokio::time::timeout(pause, a.ended.notified())
        .await
        .is_ok()
    {
        return None;
    }
    let busy = before
        .zip(CpuTicks::now())
        .is_some_and(|(b, n)| b.others_busy_until(&n) > BUSY);
    Some(busy)
}

/// Runs one step of the handler's deferred work (`work`: its urgent or
/// idle work) on a blocking thread; returns what it says is left, or
/// `failed` when it panicked.
async fn step<H: Handler, T: Send + 'static>(
    served: &Served<H>,
    work: impl FnOnce(&mut H) -> T + Send + 'static,
    failed: T,
) -> T {
    let mut guard = Arc::clone(&served.handler).lock_owned().await;
    tokio::task::spawn_blocking(move || work(&mut guard))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "the deferred work failed");
            failed
        })
}

/// One step of the handler's idle work; what it left.
async fn idle_step<H: Handler>(served: &Served<H>, busy: bool) -> Left {
    step(served, move |h: &mut H| h.idle(busy), Left::Nothing).await
}

fn panicked(e: &tokio::task::JoinError) -> Reply {
    tracing::error!(error = %e, "the request handler failed");
    Reply::err(
        500,
        format!("internal error: {e}; the plugin is still up, retry"),
    )
}

/// Streams an upload's body to the handler while it arrives; answers.
/// Returns whether the connection may serve another request.
async fn upload<H: Handler>(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    handler: &Served<H>,
    head: Head,
    limits: &Limits,
) -> bool {
    let path = head.path.clone();
    let started = locked(handler, move |h| h.upload(&path)).await;
    let mut body = BodyStream::new(head.framing);
    let job = match started.and_then(|s| s) {
        Ok(job) => job,
        Err(reply) => {
            // Answered before reading: the rest is read and dropped.
            if write_reply(stream, &reply, false, limits).await.is_ok() {
                while let Ok(Some(_)) = body.next(stream, buf, limits).await {}
            }
            return false;
        }
    };
    let (tx, rx) = mpsc::channel::<io::Result<Vec<u8>>>(IN_FLIGHT);
    let job = tokio::task::spawn_blocking(move || {
        let mut body = ChannelReader {
            rx,
            chunk: Vec::new(),
            at: 0,
        };
        job(&mut body)
    });
    // Whether the body was read to its end, or broke off.
    let mut ended = false;
    let mut broken = false;
    loop {
        match body.next(stream, buf, limits).await {
            Ok(Some(chunk)) => {
                if tx.send(Ok(chunk)).await.is_err() {
                    // The handler answered without reading it all.
                    break;
                }
            }
            Ok(None) => {
                ended = true;
                break;
            }
            Err(e) => {
                tracing::info!(error = %e, path = %head.path, "an upload broke off");
                let _ = tx.send(Err(e)).await;
                broken = true;
                break;
            }
        }
    }
    drop(tx);
    let reply = match job.await {
        Ok(finish) => locked(handler, finish).await.unwrap_or_else(|reply| reply),
        Err(e) => panicked(&e),
    };
    if broken {
        let _ = write_reply(stream, &reply, false, limits).await;
        return false;
    }
    let keep_alive = head.keep_alive && ended;
    if write_reply(stream, &reply, keep_alive, limits)
        .await
        .is_err()
    {
        return false;
    }
    if !ended {
        // Read the rest (a client that writes its whole body before it
        // reads would never see the answer otherwise), then close.
        while let Ok(Some(_)) = body.next(stream, buf, limits).await {}
    }
    keep_alive
}

/// Runs a download: the handler writes, the connection sends chunks.
/// Returns whether the connection may serve another request.
async fn download<H: Handler>(
    stream: &mut UnixStream,
    handler: &Served<H>,
    head: Head,
    body: Vec<u8>,
    limits: &Limits,
) -> bool {
    let path = head.path.clone();
    let started = locked(handler, move |h| h.download(&path, &body)).await;
    let job = match started.and_then(|s| s) {
        Ok(job) => job,
        Err(reply) => {
            return write_reply(stream, &reply, head.keep_alive, limits)
                .await
                .is_ok()
                && head.keep_alive;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    let job = tokio::task::spawn_blocking(move || {
        let mut out = io::BufWriter::with_capacity(CHUNK, ChannelWriter { tx });
        let finish = job(&mut out);
        let flushed = out
            .flush()
            .map_err(|e| Reply::err(500, format!("sending the stream: {e}")));
        (finish, flushed)
    });
    let mut started = false;
    let mut failed = false;
    while let Some(chunk) = rx.recv().await {
        let mut frame = Vec::with_capacity(chunk.len() + 128);
        if !started {
            frame.extend_from_slice(stream_head(head.keep_alive).as_bytes());
            started = true;
        }
        frame.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if write_all(stream, &frame, limits).await.is_err() {
            failed = true;
            // The handler's next write fails: it stops.
            rx.close();
            break;
        }
    }
    // The job's finish runs before the stream's end goes out.
    let done = match job.await {
        Ok((finish, flushed)) => locked(handler, move |h| finish(h).and(flushed))
            .await
            .and_then(|r| r),
        Err(e) => Err(panicked(&e)),
    };
    if failed {
        tracing::info!(path = %head.path, "the client stopped reading a streamed answer");
        return false;
    }
    match (done, started) {
        (Ok(()), started) => {
            let mut end = Vec::new();
            if !started {
                end.extend_from_slice(stream_head(head.keep_alive).as_bytes());
            }
            end.extend_from_slice(b"0\r\n\r\n");
            write_all(stream, &end, limits).await.is_ok() && head.keep_alive
        }
        (Err(reply), false) => {
            write_reply(stream, &reply, head.keep_alive, limits)
                .await
                .is_ok()
                && head.keep_alive
        }
        (Err(reply), true) => {
            // Bytes went out: break the stream off without its last chunk.
            tracing::warn!(path = %head.path, reply = %reply.body, "a streamed answer failed half way; breaking it off");
            false
        }
    }
}

fn stream_head(keep_alive: bool) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {STREAM_CONTENT_TYPE}\r\nTransfer-Encoding: chunked\r\nConnection: {}\r\n\r\n",
        if keep_alive { "keep-alive" } else { "close" }
    )
}

/// The handler's side of an upload: the chunks the connection receives.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(Ok(c)) => {
                    self.chunk = c;
                    self.at = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len() - self.at);
        out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The handler's side of a download: each write one chunk to send.
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        self.tx.blocking_send(data.to_vec()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client stopped reading the stream",
            )
        })?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A request body read piece by piece, `Content-Length` or chunked.
struct BodyStream {
    framing: Framing,
    /// Bytes left of a length-framed body, or of the current chunk.
    left: usize,
    /// Chunked: the size line of the next chunk is due (after the CRLF
    /// that ends the previous chunk's data, unless this is the first).
    need_size: bool,
    first: bool,
    done: bool,
}

/// The longest chunk-size line (with extensions) or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

impl BodyStream {
    fn new(framing: Framing) -> BodyStream {
        BodyStream {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                Framing::Chunked => 0,
            },
            need_size: true,
            first: true,
            done: false,
        }
    }

    /// The next piece of the body, `None` at its end; an error if it broke
    /// off, stalled past the idle bound, or is malformed.
    async fn next(
        &mut self,
        stream: &mut UnixStream,
        buf: &mut Vec<u8>,
        limits: &Limits,
    ) -> io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        if self.framing == Framing::Chunked && self.need_size {
            if !self.first {
                let crlf = take_line(stream, buf, limits).await?;
                if !crlf.is_empty() {
                    return Err(bad_chunk("chunk data not followed by CRLF"));
                }
            }
            self.first = false;
            let line = take_line(stream, buf, limits).await?;
            let line = String::from_utf8_lossy(&line);
            let hex = line.split(';').next().unwrap_or_default().trim();
            self.left = usize::from_str_radix(hex, 16)
                .map_err(|_| bad_chunk(&format!("bad chunk size `{hex}`")))?;
            self.need_size = false;
            if self.left == 0 {
                // Trailers, up to the blank line.
                while !take_line(stream, buf, limits).await?.is_empty() {}
                self.done = true;
                return Ok(None);
            }
        }
        if self.left == 0 {
            self.done = true;
            return Ok(None);
        }
        if buf.is_empty() {
            fill_idle(stream, buf, limits).await?;
        }
        let n = self.left.min(buf.len()).min(CHUNK);
        let piece: Vec<u8> = buf.drain(..n).collect();
        self.left -= n;
        if self.left == 0 && self.framing == Framing::Chunked {
            self.need_size = true;
        }
        Ok(Some(piece))
    }
}

fn bad_chunk(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed chunked body: {what}"),
    )
}

/// One CRLF-terminated line from the front of `buf` (reading more as
/// needed), without its CRLF.
async fn take_line(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> io::Result<Vec<u8>> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf[..i].to_vec();
            buf.drain(..i + 2);
            return Ok(line);
        }
        if buf.len() > MAX_CHUNK_LINE {
            return Err(bad_chunk("a chunk-size or trailer line is too long"));
        }
        fill_idle(stream, buf, limits).await?;
    }
}

/// Reads more into `buf` within the idle bound only (a stream's body).
async fn fill_idle(stream: &mut UnixStream, buf: &mut Vec<u8>, limits: &Limits) -> io::Result<()> {
    let mut chunk = vec![0u8; CHUNK];
    match tokio::time::timeout(limits.idle, stream.read(&mut chunk)).await {
        Ok(Ok(0)) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the client closed the connection before the body ended",
        )),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the body stalled: no progress for {} s",
                limits.idle.as_secs()
            ),
        )),
    }
}

/// Reads one request head from `stream`, keeping what follows it in `buf`.
async fn read_head(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    limits: &Limits,
    started: Instant,
) -> Result<Head, Refusal> {
    let head = loop {
        match parse_head(buf, limits) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(reply) => return Err(Refusal::Answer(reply)),
        }
        fill(stream, buf, limits, started).await?;
    };
    buf.drain(..head.len);
    Ok(head)
}

/// Reads a body of `n` bytes whole, within the request's time bounds.
async fn read_exact_body(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    n: usize,
    limits: &Limits,
    started: Instant,
) -> Result<Vec<u8>, Refusal> {
    while buf.len() < n {
        fill(stream, buf, limits, started).await?;
    }
    Ok(buf.drain(..n).collect())
}

/// Reads more into `buf`, within the idle and request time bounds.
async fn fill(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    limits: &Limits,
    started: Instant,
) -> Result<(), Refusal> {
    let left = limits.request.saturating_sub(started.elapsed());
    let wait = limits.idle.min(left);
    let mut chunk = [0u8; 16 << 10];
    match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Err(Refusal::Close),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        // A client that never said a thing is dropped quietly.
        Err(_) if buf.is_empty() => Err(Refusal::Close),
        Err(_) => Err(Refusal::Answer(Reply::err(
            408,
            format!(
                "the request did not arrive in time (no progress for {} s, or longer than {} s in all)",
                limits.idle.as_secs(),
                limits.request.as_secs()
            ),
        ))),
    }
}

/// Parses a request head from the front of `buf`: `None` while it is
/// incomplete (and within bounds). The body's framing is checked against
/// the endpoint's route by [`check_body`].
fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Head>, Reply> {
    let too_big = || {
        Reply::err(
            431,
            format!("request head larger than {} bytes", limits.max_header),
        )
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > limits.max_header => return Err(too_big()),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_header => return Err(too_big()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reply::err(431, "more than 64 request headers"));
        }
        Err(e) => return Err(Reply::err(400, format!("malformed HTTP request: {e}"))),
    };
    let method = req.method.unwrap_or_default();
    if method != "POST" {
        return Err(Reply::err(
            405,
            format!("method {method} not allowed: the plugin protocol is POST with a JSON body"),
        ));
    }
    let path = req.path.unwrap_or_default().to_owned();
    let http11 = req.version == Some(1);
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut keep_alive = http11;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| Reply::err(400, format!("bad Content-Length `{value}`")))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(Reply::err(400, "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") || chunked {
                return Err(Reply::err(
                    411,
                    format!("Transfer-Encoding `{value}` is not accepted: send a Content-Length"),
                ));
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        }
    }
    let framing = match (chunked, content_length) {
        (true, Some(_)) => {
            return Err(Reply::err(
                400,
                "both Content-Length and Transfer-Encoding: send one",
            ));
        }
        (true, None) => Framing::Chunked,
        (false, n) => Framing::Length(n.unwrap_or(0)),
    };
    Ok(Some(Head {
        path,
        framing,
        keep_alive,
        len,
    }))
}

/// Whether `head`'s body may be taken as `route` takes it: only an upload
/// may be chunked or larger than [`Limits::max_body`].
fn check_body(head: &Head, route: Route, limits: &Limits) -> Result<(), Reply> {
    match (route, head.framing) {
        (Route::Upload, _) => Ok(()),
        (_, Framing::Chunked) => Err(Reply::err(
            411,
            "Transfer-Encoding `chunked` is not accepted here: send a Content-Length",
        )),
        (_, Framing::Length(n)) if n > limits.max_body => Err(Reply::err(
            413,
            format!(
                "request body of {n} bytes is larger than the {} bytes a plugin request may have",
                limits.max_body
            ),
        )),
        _ => Ok(()),
    }
}

/// Writes `reply`, within the idle bound.
async fn write_reply(
    stream: &mut UnixStream,
    reply: &Reply,
    keep_alive: bool,
    limits: &Limits,
) -> io::Result<()> {
    let body = reply.body.to_string();
    let text = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
        reply.status,
        reason(reply.status),
        body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    write_all(stream, text.as_bytes(), limits).await
}

/// Writes `bytes`, within the idle bound.
async fn write_all(stream: &mut UnixStream, bytes: &[u8], limits: &Limits) -> io::Result<()> {
    match tokio::time::timeout(limits.idle, stream.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client does not read its answer",
        )),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<Head>, Reply> {
        let h = parse_head(s.as_bytes(), &Limits::default())?;
        if let Some(h) = &h {
            check_body(h, Route::Json, &Limits::default())?;
        }
        Ok(h)
    }

    #[test]
    fn heads_parse_within_bounds() {
        let h = head("POST /VolumeDriver.List HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap()
            .unwrap();
        assert_eq!(h.path, "/VolumeDriver.List");
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.keep_alive);
        assert_eq!(h.len, 55);
        let h = head("POST /x HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        assert_eq!(h.framing, Framing::Length(0));
        assert_eq!(head("POST /x HTTP/1.1\r\nContent-Le").unwrap(), None);
        let status = |s: &str| head(s).unwrap_err().status;
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("\x16\x03\x01garbage\r\n\r\n"), 400);
        assert_eq!(
            status("POST /x HTTP/1.1\r\nContent-Length: 104857600\r\n\r\n"),
            413
        );
        assert_eq!(
            status("POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        let long = format!("POST /x HTTP/1.1\r\nX-A: {}", "a".repeat(70 << 10));
        assert_eq!(status(&long), 431);
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(status(&format!("POST /x HTTP/1.1\r\n{many}\r\n")), 431);
    }

    /// HTTP/1.1's `Host` is never read: clients that send the socket path
    /// there (or none at all) are answered, unlike
    /// h2's strict `:authority` (crates/snapshotter authority.rs).
    #[test]
    fn any_host_is_taken() {
        for req in [
            "POST /Plugin.Activate HTTP/1.1\r\nHost: /run/docker/plugins/thinlayer.sock\r\n\r\n",
            "POST /Plugin.Activate HTTP/1.1\r\nHost: unix:///run/x.sock\r\n\r\n",
            "POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\n\r\n",
            "POST /Plugin.Activate HTTP/1.0\r\n\r\n",
        ] {
            let h = head(req).unwrap().unwrap();
            assert_eq!(h.path, "/Plugin.Activate", "{req:?}");
        }
    }

    /// Idle work of `left` steps, each noting when it ran (on tokio's
    /// clock), after `wait` calls that answer it waits for a quieter
    /// machine (each noting when it was asked); at step `start_at`, a
    /// request starts (and ends at once).
    #[derive(Default)]
    struct Steps {
        left: usize,
        wait: usize,
        at: Vec<tokio::time::Instant>,
        asked: Vec<tokio::time::Instant>,
        start_at: Option<usize>,
        activity: Arc<Activity>,
    }
    impl Handler for Steps {
        fn handle(&mut self, _: &str, _: &[u8]) -> Reply {
            Reply::ok(json!({}))
        }

        fn idle(&mut self, _: bool) -> Left {
            if self.wait > 0 {
                self.wait -= 1;
                self.asked.push(tokio::time::Instant::now());
                return Left::WhenQuiet;
            }
            if self.left == 0 {
                return Left::Nothing;
            }
            self.at.push(tokio::time::Instant::now());
            if self.start_at == Some(self.at.len()) {
                let a = &self.activity;
                a.started.fetch_add(1, Ordering::Relaxed);
                a.ended.notify_one();
            }
            self.left -= 1;
            if self.left > 0 {
                Left::More
            } else {
                Left::Nothing
            }
        }
    }

    /// Runs the settler on `steps` after one request, for 10 s of tokio's
    /// paused clock; returns when the request ended, and the steps as they
    /// were left.
    async fn settled(steps: Steps) -> (tokio::time::Instant, Steps) {
        let activity = Arc::new(Activity::default());
        let steps = Steps {
            activity: Arc::clone(&activity),
            ..steps
        };
        let served = Served {
            handler: Arc::new(Mutex::new(steps)),
            activity,
        };
        let settler = tokio::spawn(settle(served.clone()));
        let ended = tokio::time::Instant::now();
        served.activity.started.fetch_add(1, Ordering::Relaxed);
        served.activity.ended.notify_one();
        tokio::time::sleep(Duration::from_secs(10)).await;
        settler.abort();
        let mut steps = served.handler.lock().await;
        assert_eq!(steps.left, 0, "every step ran");
        (ended, std::mem::take(&mut *steps))
    }

    /// The idle work waits for one pause after the last request, then runs
    /// step after step (no pause between them), so it is done soon after.
    #[tokio::test(start_paused = true)]
    async fn idle_steps_run_back_to_back_after_a_pause() {
        let (ended, Steps { at, .. }) = settled(Steps {
            left: 5,
            ..Steps::default()
        })
        .await;
        assert!(
            at[0] - ended >= SETTLE_AFTER,
            "the first step waits for the pause"
        );
        assert!(
            at[4] - at[0] < SETTLE_AFTER,
            "the rest follow at once: {at:?}"
        );
    }

    /// A request that starts between two steps stops them: the next waits
    /// for a pause after it again.
    #[tokio::test(start_paused = true)]
    async fn a_request_between_steps_pauses_the_rest() {
        let (_, Steps { at, .. }) = settled(Steps {
            left: 4,
            start_at: Some(2),
            ..Steps::default()
        })
        .await;
        assert!(at[1] - at[0] < SETTLE_AFTER, "{at:?}");
        assert!(
            at[2] - at[1] >= SETTLE_AFTER,
            "a pause after the request: {at:?}"
        );
        assert!(at[3] - at[2] < SETTLE_AFTER, "{at:?}");
    }

    /// Work that waits for a quieter machine is asked again every
    /// `RETRY`, not back to back, and runs once the handler lets it.
    #[tokio::test(start_paused = true)]
    async fn work_waiting_for_a_quiet_machine_is_asked_again_later() {
        let (ended, Steps { at, asked, .. }) = settled(Steps {
            left: 2,
            wait: 3,
            ..Steps::default()
        })
        .await;
        assert_eq!(asked.len(), 3);
        assert!(asked[0] - ended >= SETTLE_AFTER, "{asked:?}");
        for pair in asked.windows(2) {
            assert!(pair[1] - pair[0] >= RETRY, "{asked:?}");
            assert!(pair[1] - pair[0] < SETTLE_AFTER, "{asked:?}");
        }
        assert!(at[0] - asked[2] >= RETRY, "{at:?} after {asked:?}");
        assert!(at[1] - at[0] < RETRY, "then back to back: {at:?}");
    }

    struct Echo;
    impl Handler for Echo {
        fn route(path: &str) -> Route {
            if path.starts_with("/up") {
                Route::Upload
            } else if path.starts_with("/down") {
                Route::Download
            } else {
                Route::Json
            }
        }

        fn handle(&mut self, path: &str, body: &[u8]) -> Reply {
            assert!(path != "/panic", "asked to panic");
            Reply::ok(json!({"Path": path, "Len": body.len()}))
        }

        fn upload(&mut self, path: &str) -> Result<Upload<Echo>, Reply> {
            let path = path.to_owned();
            Ok(Box::new(move |body| {
                let reply = echo_upload(&path, body);
                Box::new(move |_: &mut Echo| reply)
            }))
        }

        fn download(&mut self, path: &str, body: &[u8]) -> Result<Download<Echo>, Reply> {
            if path == "/down-refused" {
                return Err(Reply::err(500, "no such layer; list them first"));
            }
            let (path, body) = (path.to_owned(), body.to_vec());
            Ok(Box::new(move |out| {
                let done = echo_download(&path, &body, out);
                Box::new(move |_: &mut Echo| done)
            }))
        }
    }

    fn echo_upload(path: &str, body: &mut dyn Read) -> Reply {
        {
            let (mut n, mut sum) = (0usize, 0u64);
            let mut b = [0u8; 1000];
            loop {
                match body.read(&mut b) {
                    Ok(0) => break,
                    Ok(k) => {
                        n += k;
                        sum += b[..k].iter().map(|&x| u64::from(x)).sum::<u64>();
                    }
                    Err(e) => return Reply::err(400, format!("read: {e}")),
                }
                if path == "/up-early" && n >= 10 {
                    break;
                }
            }
            Reply::ok(json!({"Len": n, "Sum": sum}))
        }
    }

    fn echo_download(path: &str, body: &[u8], out: &mut dyn Write) -> Result<(), Reply> {
        {
            let fail = |e: io::Error| Reply::err(500, e.to_string());
            match path {
                "/down-broken" => {
                    out.write_all(&[7u8; 100_000]).map_err(fail)?;
                    out.flush().map_err(fail)?;
                    Err(Reply::err(500, "the disk failed half way"))
                }
                _ => {
                    let n: usize = String::from_utf8_lossy(body).parse().unwrap();
                    for i in 0..n {
                        out.write_all(&[u8::try_from(i % 251).unwrap()])
                            .map_err(fail)?;
                    }
                    Ok(())
                }
            }
        }
    }

    /// The status, headers and de-chunked body of a raw answer; whether
    /// the chunked body ended with its last chunk.
    fn dechunk(raw: &[u8]) -> (String, Vec<u8>, bool) {
        let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..at]).into_owned();
        let mut rest = &raw[at + 4..];
        let mut body = Vec::new();
        loop {
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                return (head, body, false);
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
            rest = &rest[eol + 2..];
            if size == 0 {
                return (head, body, rest == b"\r\n");
            }
            if rest.len() < size + 2 {
                body.extend_from_slice(&rest[..rest.len().min(size)]);
                return (head, body, false);
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    }

    /// One request over a fresh connection; the raw answer.
    async fn ask(sock: &std::path::Path, raw: &[u8]) -> String {
        String::from_utf8_lossy(&ask_raw(sock, raw).await).into_owned()
    }

    /// As [`ask`], the answer's bytes.
    async fn ask_raw(sock: &std::path::Path, raw: &[u8]) -> Vec<u8> {
        let mut c = UnixStream::connect(sock).await.unwrap();
        // The server may close before taking it all (413): that is fine.
        let _ = c.write_all(raw).await;
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        out
    }

    /// Sends `raw` twice, pipelined on one kept-alive connection, and reads
    /// until `answered` has been seen twice (panics if the server closes
    /// first); the connection is then dropped.
    async fn ask_twice(sock: &std::path::Path, raw: &[u8], answered: &[u8]) {
        let mut c = UnixStream::connect(sock).await.unwrap();
        c.write_all(&[raw, raw].concat()).await.unwrap();
        let mut got = Vec::new();
        while got
            .windows(answered.len())
            .filter(|w| *w == answered)
            .count()
            < 2
        {
            let mut b = [0u8; 1024];
            let n = c.read(&mut b).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bounds_hold_and_the_server_stays_up() {
        let dir = std::env::temp_dir().join(format!("thinlayer-http-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sock = dir.join("p.sock");
        let access = Access::default();
        let (listener, _file) = thinlayer_pool::socket::bind(&sock, &access).unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = UnixListener::from_std(listener).unwrap();
        let limits = Limits {
            idle: Duration::from_millis(500),
            request: Duration::from_secs(2),
            ..Limits::default()
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, access, limits, Echo, async move {
            let _ = stop_rx.await;
        }));
        let ok =
            b"POST /VolumeDriver.List HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";

        // Keep-alive: two requests on one connection, pipelined.
        let alive = b"POST /VolumeDriver.List HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        ask_twice(&sock, alive, b"\"Len").await;

        // A slow client: dropped after the idle bound, with 408.
        let mut slow = UnixStream::connect(&sock).await.unwrap();
        slow.write_all(b"POST /VolumeDriver.List HTTP/1.1\r\nContent-Len")
            .await
            .unwrap();
        // Meanwhile another is answered.
        assert!(ask(&sock, ok).await.contains("200 OK"));
        let t = Instant::now();
        let mut out = String::new();
        slow.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert!(t.elapsed() < Duration::from_secs(3));

        // A body too large is refused unread.
        let mut big =
            b"POST /VolumeDriver.Create HTTP/1.1\r\nContent-Length: 104857600\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', 4 << 20));
        let out = ask(&sock, &big).await;
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        assert!(out.contains("\"Err\""), "{out}");

        // A panicking handler: 500, and the next request is answered.
        let out = ask(&sock, b"POST /panic HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 500"), "{out}");
        assert!(ask(&sock, ok).await.contains("\"Len\":2"));

        // Uploads: chunked (with a chunk extension), and longer than a JSON
        // body may be; a JSON endpoint still refuses chunked bodies.
        let out = ask(
            &sock,
            b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n3;x=1\r\nabc\r\n0\r\n\r\n",
        )
        .await;
        assert!(out.contains("\"Len\":8"), "{out}");
        let big = 3usize << 20;
        let mut req =
            format!("POST /up HTTP/1.1\r\nContent-Length: {big}\r\nConnection: close\r\n\r\n")
                .into_bytes();
        req.extend(std::iter::repeat_n(1u8, big));
        let out = ask(&sock, &req).await;
        assert!(out.contains(&format!("\"Len\":{big}")), "{out}");
        let out = ask(
            &sock,
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 411"), "{out}");
        // Two chunked uploads on one kept-alive connection.
        let one = b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n";
        ask_twice(&sock, one, b"\"Len\":2,").await;

        // An upload that breaks off: the handler reads an error, answers.
        let mut c = UnixStream::connect(&sock).await.unwrap();
        c.write_all(b"POST /up HTTP/1.1\r\nContent-Length: 100000\r\n\r\nonly this")
            .await
            .unwrap();
        c.shutdown().await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(
            out.contains("\"Err\"") && out.contains("before the body ended"),
            "{out}"
        );
        // A malformed chunk size is an error the handler sees.
        let out = ask(
            &sock,
            b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        )
        .await;
        assert!(out.contains("bad chunk size"), "{out}");
        // A handler that answers before the end: the rest is read and
        // dropped, so a client that writes it all still gets the answer.
        let mut req =
            format!("POST /up-early HTTP/1.1\r\nContent-Length: {big}\r\n\r\n").into_bytes();
        req.extend(std::iter::repeat_n(1u8, big));
        let out = ask(&sock, &req).await;
        assert!(
            out.starts_with("HTTP/1.1 200") && out.contains("Connection: close"),
            "{out}"
        );

        // Downloads: streamed chunked; refused before the first byte as
        // JSON; broken off without the last chunk after it.
        let raw = ask_raw(
            &sock,
            b"POST /down HTTP/1.1\r\nContent-Length: 6\r\nConnection: close\r\n\r\n300000",
        )
        .await;
        let (head, body, whole) = dechunk(&raw);
        assert!(
            head.starts_with("HTTP/1.1 200") && head.contains("chunked"),
            "{head}"
        );
        assert!(whole, "the stream ends with its last chunk");
        assert_eq!(body.len(), 300_000);
        assert!(
            body.iter()
                .enumerate()
                .all(|(i, &b)| usize::from(b) == i % 251)
        );
        let out = ask(
            &sock,
            b"POST /down-refused HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 500") && out.contains("no such layer"),
            "{out}"
        );
        let mut c = UnixStream::connect(&sock).await.unwrap();
        c.write_all(b"POST /down-broken HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        c.read_to_end(&mut raw).await.unwrap();
        let (head, body, whole) = dechunk(&raw);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!whole, "a failed stream must not look complete");
        assert_eq!(body.len(), 100_000);
        // The server is still up.
        assert!(ask(&sock, ok).await.contains("200 OK"));

        // A download piped straight into an upload, as dockerd pipes a
        // Diff into an ApplyDiff: both streams flow at once (neither holds
        // the handler), so a body far larger than the channels completes.
        let n = 8usize << 20;
        let mut down = UnixStream::connect(&sock).await.unwrap();
        down.write_all(
            format!(
                "POST /down HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{n}",
                n.to_string().len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(down.read(&mut b).await.unwrap(), 1, "the download's head");
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200"));
        let mut up = UnixStream::connect(&sock).await.unwrap();
        up.write_all(
            b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        // The download's chunked framing is the upload's as it is.
        let piped = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::io::copy(&mut down, &mut up).await.unwrap();
            let mut out = String::new();
            up.read_to_string(&mut out).await.unwrap();
            out
        })
        .await
        .expect("a download piped into an upload completes");
        let sum: u64 = (0..n).map(|i| (i % 251) as u64).sum();
        assert!(
            piped.contains(&format!("\"Len\":{n},\"Sum\":{sum}")),
            "{piped}"
        );

        stop_tx.send(()).unwrap();
        server.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
