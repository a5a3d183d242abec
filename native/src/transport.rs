//! The transport thread: listeners, HTTP/2 connections and gRPC streams on one tokio
//! current-thread runtime, calling Python once per message with the GIL taken for just
//! that call.

use crate::grpc::{self, Parsed, Status};
use crate::tls::{self, Reloadable};
use crate::{Call, CallState, Connection, Event};
use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::{ffi, intern};
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub const SERVING: u8 = 0;
pub const DRAINING: u8 = 1;
pub const STOPPED: u8 = 2;

pub enum Kind {
    Unary,
    ServerStreaming,
    Bidi,
}

pub struct Method {
    pub kind: Kind,
    pub handler: Py<PyAny>,
    /// Counted in `Shared::active`, which a drain waits on; a health `Watch` is not (it
    /// would hold every drain for its whole grace period).
    pub counted: bool,
    pub end_idle_on_drain: bool,
    /// How long a bidi stream may wait for its next message, and the status message then.
    pub idle: Option<(Duration, String)>,
}

/// What every connection and stream of one server reads.
pub struct Shared {
    pub methods: HashMap<String, Method>,
    pub max_message_size: usize,
    pub max_concurrent_streams: u32,
    /// GOAWAY after this long (±10%), then `max_connection_age_grace` for the streams in
    /// flight: a gateway's long-lived connections come back, maybe to another worker.
    pub max_connection_age: Option<Duration>,
    pub max_connection_age_grace: Duration,
    pub active: AtomicUsize,
}

/// A thread state that lives as long as the transport thread: taking the GIL is then a
/// restore of this state, not the creation of a new one for every call (which measured
/// ~50 µs a request).
struct PersistentThreadState {
    gil: ffi::PyGILState_STATE,
    saved: *mut ffi::PyThreadState,
}

impl PersistentThreadState {
    fn new() -> Self {
        // SAFETY: the interpreter is initialised (this module was imported); the state made
        // here is released on this same thread in `drop`.
        unsafe {
            let gil = ffi::PyGILState_Ensure();
            let saved = ffi::PyEval_SaveThread();
            PersistentThreadState { gil, saved }
        }
    }
}

impl Drop for PersistentThreadState {
    fn drop(&mut self) {
        // SAFETY: undoes `new` on the thread that called it.
        unsafe {
            ffi::PyEval_RestoreThread(self.saved);
            ffi::PyGILState_Release(self.gil);
        }
    }
}

pub enum Socket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// A bound socket, with the TLS configuration its connections get when it is a TLS one.
pub type Listener = (Socket, Option<Arc<Reloadable>>);

/// The body of the transport thread; returns once the state says STOPPED. Tasks still
/// running then are dropped with the runtime, which ends their streams.
pub fn run(listeners: Vec<Listener>, shared: Arc<Shared>, state: watch::Receiver<u8>) {
    let thread_state = PersistentThreadState::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime");
    runtime.block_on(async {
        for (listener, tls) in listeners {
            tokio::spawn(accept_loop(listener, tls, shared.clone(), state.clone()));
        }
        let mut state = state;
        while *state.borrow_and_update() != STOPPED {
            if state.changed().await.is_err() {
                break;
            }
        }
    });
    drop(runtime);
    drop(thread_state);
}

fn peer_name(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("ipv4:{a}"),
        SocketAddr::V6(a) => format!("ipv6:{a}"),
    }
}

/// A unix peer as gRPC writes it: `unix:` and the path the client bound, which is
/// usually none.
fn unix_peer_name(addr: &tokio::net::unix::SocketAddr) -> String {
    match addr.as_pathname() {
        Some(path) => format!("unix:{}", path.display()),
        None => "unix:".to_owned(),
    }
}

enum Accepting {
    Tcp(TcpListener),
    Unix(UnixListener),
}

async fn accept_loop(
    listener: Socket,
    tls: Option<Arc<Reloadable>>,
    shared: Arc<Shared>,
    mut state: watch::Receiver<u8>,
) {
    let listener = match listener {
        Socket::Tcp(listener) => TcpListener::from_std(listener).map(Accepting::Tcp),
        Socket::Unix(listener) => UnixListener::from_std(listener).map(Accepting::Unix),
    };
    let Ok(listener) = listener else {
        return;
    };
    let for_connections = state.clone();
    loop {
        tokio::select! {
            () = accept(&listener, &tls, &shared, &for_connections) => {}
            changed = state.changed() => {
                if changed.is_err() || *state.borrow() == STOPPED {
                    return;
                }
            }
        }
    }
}

/// The HTTP/2 limits of every connection, chosen for a gateway's traffic and against abuse
/// (see the native transport's notes in `_server.py` for the reasoning behind each value).
fn h2_builder(shared: &Shared) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_concurrent_streams(shared.max_concurrent_streams)
        // gRPC metadata is small (grpcio refuses more than 16 KiB); h2's default buffers up to
        // 16 MiB of one header block, per connection, for a peer that never ends it.
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        // Bytes queued per stream beyond what the peer's window lets out; replies are sent as
        // capacity is granted (`send_with_capacity`), so this bounds what one stream holds.
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
        // Streams the peer opens and resets before they are accepted. Envoy does this only
        // when a request is cancelled that fast, but a stalled callback lets many pile up in
        // one read; rapid reset floods far past this and ends with GOAWAY ENHANCE_YOUR_CALM.
        .max_pending_accept_reset_streams(shared.max_concurrent_streams as usize)
        // Resets the library sends for the peer's protocol errors, counted over the
        // connection's life; Envoy's normal RST_STREAM is not one of them.
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        // Streams this side reset, remembered so the peer's late frames on them are ignored
        // rather than treated as errors: room for every stream of a connection being ended
        // at once (a drain), several times over, within the spec's "some time".
        .max_concurrent_reset_streams(4 * shared.max_concurrent_streams as usize)
        .reset_stream_duration(Duration::from_secs(5));
    builder
}

const MAX_HEADER_LIST_SIZE: u32 = 64 << 10;
const MAX_SEND_BUFFER_SIZE: usize = 64 << 10;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// `age` plus or minus 10%, so the connections made together do not all go away together.
fn jittered(age: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let spread = (random % 2001) as f64 / 10_000.0 - 0.1; // -0.1 ..= 0.1
    age.mul_f64(1.0 + spread)
}

/// True when the peer reset the stream before it was accepted: rapid reset's pattern,
/// answered without any work.
fn already_reset(respond: &mut SendResponse<Bytes>) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    matches!(respond.poll_reset(&mut cx), Poll::Ready(_))
}

/// Accepts one connection and starts serving it.
async fn accept(
    listener: &Accepting,
    tls: &Option<Arc<Reloadable>>,
    shared: &Arc<Shared>,
    state: &watch::Receiver<u8>,
) {
    let (shared, state, tls) = (shared.clone(), state.clone(), tls.clone());
    match listener {
        Accepting::Tcp(listener) => {
            let Ok((socket, addr)) = listener.accept().await else {
                return;
            };
            let _ = socket.set_nodelay(true);
            tokio::spawn(handshake(socket, peer_name(addr), tls, shared, state));
        }
        Accepting::Unix(listener) => {
            let Ok((socket, addr)) = listener.accept().await else {
                return;
            };
            let peer = unix_peer_name(&addr);
            tokio::spawn(handshake(socket, peer, tls, shared, state));
        }
    }
}

/// The TLS handshake when the listener has TLS (with the configuration in use at this
/// moment), then the connection. What the peer is known by is made here, once.
async fn handshake<T>(
    socket: T,
    peer: String,
    tls: Option<Arc<Reloadable>>,
    shared: Arc<Shared>,
    state: watch::Receiver<u8>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    match tls {
        Some(tls) => {
            // A client refused here (no certificate, an unknown CA) only loses its own
            // connection.
            if let Ok(stream) = tls.acceptor().accept(socket).await {
                let auth = tls::auth_context(stream.get_ref().1);
                let connection = Arc::new(Connection { peer, auth });
                serve_connection(stream, shared, state, connection).await;
            }
        }
        None => {
            let connection = Arc::new(Connection {
                peer,
                auth: tls::insecure(),
            });
            serve_connection(socket, shared, state, connection).await;
        }
    }
}

async fn serve_connection<T>(
    io: T,
    shared: Arc<Shared>,
    mut state: watch::Receiver<u8>,
    connection_info: Arc<Connection>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(mut connection) = h2_builder(&shared).handshake::<_, Bytes>(io).await else {
        return;
    };
    // A connection made while draining is served (health answers NOT_SERVING, the
    // protocols UNAVAILABLE); only those open when the drain began are told to go away.
    state.borrow_and_update();
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let mut aged_at = shared
        .max_connection_age
        .map_or(far, |age| Instant::now() + jittered(age));
    let mut ageing = false;
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, mut respond))) => {
                    if already_reset(&mut respond) {
                        continue;
                    }
                    let (shared, info, state) =
                        (shared.clone(), connection_info.clone(), state.clone());
                    tokio::spawn(serve_stream(shared, request, respond, info, state));
                }
                _ => return,
            },
            changed = state.changed() => {
                if changed.is_err() || *state.borrow() == STOPPED {
                    return;
                }
                connection.graceful_shutdown();
            }
            _ = tokio::time::sleep_until(aged_at) => {
                if ageing {
                    // The grace is over: what is still open is cut, as grpcio does.
                    return;
                }
                ageing = true;
                connection.graceful_shutdown();
                aged_at = Instant::now() + shared.max_connection_age_grace;
            }
        }
    }
}

/// The reply side of one stream: headers go out with the first message, or with the status
/// as a trailers-only response.
struct Reply {
    respond: SendResponse<Bytes>,
    send: Option<SendStream<Bytes>>,
    call: Arc<CallState>,
}

impl Reply {
    async fn send(&mut self, framed: Bytes) -> Result<(), h2::Error> {
        let send = match &mut self.send {
            Some(send) => send,
            None => {
                let initial = self.call.initial.lock().unwrap().clone();
                let head = grpc::response_head(&initial);
                self.send.insert(self.respond.send_response(head, false)?)
            }
        };
        send_with_capacity(send, framed).await
    }

    fn finish(&mut self, status: &Status) {
        let trailing = self.call.trailing.lock().unwrap().clone();
        match &mut self.send {
            Some(send) => {
                let _ = send.send_trailers(grpc::trailers(status, &trailing));
            }
            None => {
                let initial = self.call.initial.lock().unwrap().clone();
                let response = grpc::trailers_only(status, &initial, &trailing);
                let _ = self.respond.send_response(response, true);
            }
        }
    }

    /// Resolves when the client resets the stream.
    async fn reset(&mut self) {
        let _ = poll_fn(|cx| match &mut self.send {
            Some(send) => send.poll_reset(cx),
            None => self.respond.poll_reset(cx),
        })
        .await;
    }
}

/// Sends `data` no faster than the peer's flow-control window lets it out: a peer that
/// never opens its window holds this stream (which then reads no further requests), not a
/// growing buffer. With the window open, capacity is granted at once and this is one frame.
async fn send_with_capacity(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let mut granted = send.capacity();
        if granted == 0 {
            granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(granted)) => granted,
                Some(Err(error)) => return Err(error),
                // The stream can send no more: the peer reset it.
                None => return Err(h2::Error::from(h2::Reason::CANCEL)),
            };
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, false)?;
    }
    Ok(())
}

/// Counts a stream in for as long as it lives.
struct Active(Arc<Shared>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Calls the Python stream's `on_end` however the stream ends: answered, reset by the
/// client, past its deadline, or dropped when the server stops.
struct OnEnd(Py<PyAny>);

impl Drop for OnEnd {
    fn drop(&mut self) {
        Python::attach(|py| {
            if let Err(error) = self.0.call_method0(py, intern!(py, "on_end")) {
                error.write_unraisable(py, None);
            }
        });
    }
}

/// The reading side of one stream: messages out of DATA frames, flow control given back as
/// they are consumed.
struct Messages {
    body: RecvStream,
    buffer: BytesMut,
    max: usize,
}

enum Next {
    Message(Bytes),
    HalfClosed,
    Refused(Status),
    Reset,
}

impl Messages {
    async fn next(&mut self) -> Next {
        loop {
            match grpc::next_message(&mut self.buffer, self.max) {
                Parsed::Message(message) => return Next::Message(message),
                Parsed::Refused(status) => return Next::Refused(status),
                Parsed::Incomplete => {}
            }
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    if self.buffer.is_empty() && chunk.len() >= 5 {
                        // The common case, one whole message in one frame: no copy.
                        self.buffer = BytesMut::from(chunk);
                    } else {
                        self.buffer.extend_from_slice(&chunk);
                    }
                }
                Some(Err(_)) => return Next::Reset,
                None if self.buffer.is_empty() => return Next::HalfClosed,
                None => return Next::Refused(Status::new(grpc::INTERNAL, "truncated message")),
            }
        }
    }
}

/// What a Python call gave back.
enum Outcome {
    Reply(Bytes),
    Nothing,
    Pending,
    Failed(Status),
}

fn outcome(py: Python<'_>, result: PyResult<Bound<'_, PyAny>>, max: usize) -> Outcome {
    match result {
        Ok(value) if value.is_none() => Outcome::Nothing,
        Ok(value) => match value.cast::<PyBytes>() {
            Ok(bytes) if bytes.as_bytes().len() > max => Outcome::Failed(Status::new(
                grpc::RESOURCE_EXHAUSTED,
                "reply larger than max_message_size",
            )),
            Ok(bytes) => Outcome::Reply(grpc::frame(bytes.as_bytes())),
            Err(_) => Outcome::Pending,
        },
        Err(error) => {
            error.write_unraisable(py, None);
            Outcome::Failed(Status::new(grpc::INTERNAL, "internal error"))
        }
    }
}

fn metadata(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let key = name.as_str();
        if matches!(
            key,
            "content-type" | "te" | "grpc-timeout" | "grpc-encoding" | "grpc-accept-encoding"
        ) {
            continue;
        }
        let value = if key.ends_with("-bin") {
            match grpc::base64_decode(value.as_bytes()) {
                Some(decoded) => decoded,
                None => continue,
            }
        } else {
            value.as_bytes().to_vec()
        };
        out.push((key.to_owned(), value));
    }
    out
}

async fn serve_stream(
    shared: Arc<Shared>,
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    connection: Arc<Connection>,
    state: watch::Receiver<u8>,
) {
    let (parts, body) = request.into_parts();
    let deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(|value| grpc::parse_timeout(value.as_bytes()))
        .map(|timeout| Instant::now() + timeout);
    let (events, receiver) = mpsc::unbounded_channel();
    let call = Arc::new(CallState {
        events,
        metadata: metadata(&parts.headers),
        connection,
        deadline: deadline.map(Instant::into_std),
        initial: Mutex::new(Vec::new()),
        trailing: Mutex::new(Vec::new()),
    });
    let mut reply = Reply {
        respond,
        send: None,
        call: call.clone(),
    };
    let Some(method) = shared.methods.get(parts.uri.path()) else {
        let message = format!("Method not found: {}", parts.uri.path());
        reply.finish(&Status::new(grpc::UNIMPLEMENTED, message));
        return;
    };
    let _active = method.counted.then(|| {
        shared.active.fetch_add(1, Ordering::AcqRel);
        Active(shared.clone())
    });
    let messages = Messages {
        body,
        buffer: BytesMut::new(),
        max: shared.max_message_size,
    };
    let max = shared.max_message_size;
    let ended = {
        let answer = answer(method, call, messages, &mut reply, receiver, max, state);
        match deadline {
            Some(deadline) => tokio::select! {
                ended = answer => ended,
                _ = tokio::time::sleep_until(deadline) => {
                    Some(Status::new(grpc::DEADLINE_EXCEEDED, "Deadline Exceeded"))
                }
            },
            None => answer.await,
        }
    };
    if let Some(status) = ended {
        reply.finish(&status);
    }
}

/// Runs one stream to its end; the status to end it with, or None when the client reset it.
async fn answer(
    method: &Method,
    call: Arc<CallState>,
    mut messages: Messages,
    reply: &mut Reply,
    mut events: mpsc::UnboundedReceiver<Event>,
    max: usize,
    mut state: watch::Receiver<u8>,
) -> Option<Status> {
    let call_object = Python::attach(|py| Py::new(py, Call { state: call }));
    let Ok(call_object) = call_object else {
        return Some(Status::new(grpc::INTERNAL, "internal error"));
    };
    if let Kind::ServerStreaming = method.kind {
        return stream_out(method, call_object, messages, reply, events).await;
    }
    if let Kind::Unary = method.kind {
        let message = match messages.next().await {
            Next::Message(message) => message,
            Next::HalfClosed => {
                return Some(Status::new(grpc::INTERNAL, "Missing request message"))
            }
            Next::Refused(status) => return Some(status),
            Next::Reset => return None,
        };
        let result = Python::attach(|py| {
            let data = PyBytes::new(py, &message);
            outcome(py, method.handler.bind(py).call1((call_object, data)), max)
        });
        return match result {
            Outcome::Reply(framed) => match reply.send(framed).await {
                Ok(()) => Some(Status::new(grpc::OK, "")),
                Err(_) => None,
            },
            Outcome::Nothing => Some(Status::new(grpc::INTERNAL, "no reply")),
            Outcome::Failed(status) => Some(status),
            Outcome::Pending => match wait(reply, &mut events).await? {
                Resumed::Reply(framed) => match reply.send(framed).await {
                    Ok(()) => Some(Status::new(grpc::OK, "")),
                    Err(_) => None,
                },
                Resumed::Nothing => Some(Status::new(grpc::INTERNAL, "no reply")),
                Resumed::Finish(status) => Some(status),
            },
        };
    }
    let opened = Python::attach(|py| match method.handler.bind(py).call1((call_object,)) {
        Ok(stream) if stream.is_none() => Err(Status::new(grpc::UNAVAILABLE, "server is draining")),
        Ok(stream) => Ok(stream.unbind()),
        Err(error) => {
            error.write_unraisable(py, None);
            Err(Status::new(grpc::INTERNAL, "internal error"))
        }
    });
    let stream = match opened {
        Ok(stream) => OnEnd(stream),
        Err(status) => return Some(status),
    };
    // One timer per stream, moved on as each wait for a message begins: no Python and no
    // new timer per message.
    let mut idle = method
        .idle
        .as_ref()
        .map(|(timeout, _)| Box::pin(tokio::time::sleep(*timeout)));
    loop {
        if let (Some(timer), Some((timeout, _))) = (&mut idle, &method.idle) {
            timer.as_mut().reset(Instant::now() + *timeout);
        }
        let next = tokio::select! {
            biased;
            // The grace period is for streams mid-callback: one waiting for its next message
            // (Envoy waits on the upstream meanwhile) would only hold the drain.
            _ = state.wait_for(|state| *state != SERVING), if method.end_idle_on_drain => {
                return Some(Status::new(grpc::UNAVAILABLE, "server is draining"));
            }
            _ = expired(&mut idle) => {
                let message = method.idle.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
                return Some(Status::new(grpc::DEADLINE_EXCEEDED, message));
            }
            next = messages.next() => next,
        };
        let message = match next {
            Next::Message(message) => message,
            Next::HalfClosed => return Some(Status::new(grpc::OK, "")),
            Next::Refused(status) => return Some(status),
            Next::Reset => return None,
        };
        let result = Python::attach(|py| {
            let data = PyBytes::new(py, &message);
            let on_message = stream
                .0
                .bind(py)
                .call_method1(intern!(py, "on_message"), (data,));
            outcome(py, on_message, max)
        });
        let framed = match result {
            Outcome::Reply(framed) => framed,
            Outcome::Nothing => continue,
            Outcome::Failed(status) => return Some(status),
            Outcome::Pending => match wait(reply, &mut events).await? {
                Resumed::Reply(framed) => framed,
                Resumed::Nothing => continue,
                Resumed::Finish(status) => return Some(status),
            },
        };
        if reply.send(framed).await.is_err() {
            return None;
        }
    }
}

enum Resumed {
    Reply(Bytes),
    Nothing,
    Finish(Status),
}

/// Resolves when the stream's idle timer fires; never without one.
async fn expired(timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Waits for the answer Python completes elsewhere (on its event loop), sending any message
/// pushed meanwhile; None when the client resets the stream first.
async fn wait(reply: &mut Reply, events: &mut mpsc::UnboundedReceiver<Event>) -> Option<Resumed> {
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = reply.reset() => return None,
        };
        return Some(match event {
            Some(Event::Reply(Some(framed))) => Resumed::Reply(framed),
            Some(Event::Reply(None)) => Resumed::Nothing,
            Some(Event::Send(framed)) => {
                if reply.send(framed).await.is_err() {
                    return None;
                }
                continue;
            }
            Some(Event::Finish(status)) => Resumed::Finish(status),
            None => Resumed::Finish(Status::new(grpc::INTERNAL, "internal error")),
        });
    }
}

/// A server-streaming call: the handler gets the one request, then every message it sends
/// (with `Call.send`, from any thread) goes out until it finishes the call or the client
/// goes away.
async fn stream_out(
    method: &Method,
    call_object: Py<Call>,
    mut messages: Messages,
    reply: &mut Reply,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> Option<Status> {
    let message = match messages.next().await {
        Next::Message(message) => message,
        Next::HalfClosed => return Some(Status::new(grpc::INTERNAL, "Missing request message")),
        Next::Refused(status) => return Some(status),
        Next::Reset => return None,
    };
    let opened = Python::attach(|py| {
        let data = PyBytes::new(py, &message);
        match method.handler.bind(py).call1((call_object, data)) {
            Ok(stream) if stream.is_none() => Ok(None),
            Ok(stream) => Ok(Some(OnEnd(stream.unbind()))),
            Err(error) => {
                error.write_unraisable(py, None);
                Err(Status::new(grpc::INTERNAL, "internal error"))
            }
        }
    });
    let _stream = match opened {
        Ok(stream) => stream,
        Err(status) => return Some(status),
    };
    loop {
        match wait(reply, &mut events).await? {
            Resumed::Finish(status) => return Some(status),
            Resumed::Reply(framed) => {
                if reply.send(framed).await.is_err() {
                    return None;
                }
            }
            Resumed::Nothing => {}
        }
    }
}
