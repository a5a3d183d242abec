//! The transport thread: listeners, HTTP/2 connections and gRPC streams on one tokio
//! current-thread runtime, calling Python once per message with the GIL taken for just
//! that call.

use crate::grpc::{self, Parsed, Status};
use crate::{Call, CallState, Event};
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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

pub const SERVING: u8 = 0;
pub const DRAINING: u8 = 1;
pub const STOPPED: u8 = 2;

pub struct Method {
    pub bidi: bool,
    pub handler: Py<PyAny>,
    pub end_idle_on_drain: bool,
}

/// What every connection and stream of one server reads.
pub struct Shared {
    pub methods: HashMap<String, Method>,
    pub max_message_size: usize,
    pub max_concurrent_streams: u32,
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

pub type Listener = (std::net::TcpListener, Option<TlsAcceptor>);

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

fn peer_name(addr: SocketAddr) -> Arc<str> {
    match addr {
        SocketAddr::V4(a) => format!("ipv4:{a}").into(),
        SocketAddr::V6(a) => format!("ipv6:{a}").into(),
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut state: watch::Receiver<u8>,
) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((socket, addr)) = accepted else { continue };
                let _ = socket.set_nodelay(true);
                let (shared, state, tls) = (shared.clone(), state.clone(), tls.clone());
                tokio::spawn(async move {
                    let peer = peer_name(addr);
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(socket).await {
                                serve_connection(stream, shared, state, peer).await;
                            }
                        }
                        None => serve_connection(socket, shared, state, peer).await,
                    }
                });
            }
            changed = state.changed() => {
                if changed.is_err() || *state.borrow() == STOPPED {
                    return;
                }
            }
        }
    }
}

async fn serve_connection<T>(
    io: T,
    shared: Arc<Shared>,
    mut state: watch::Receiver<u8>,
    peer: Arc<str>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_concurrent_streams(shared.max_concurrent_streams);
    let Ok(mut connection) = builder.handshake::<_, Bytes>(io).await else {
        return;
    };
    // A connection made while draining is served (health answers NOT_SERVING, the
    // protocols UNAVAILABLE); only those open when the drain began are told to go away.
    state.borrow_and_update();
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    let (shared, peer, state) = (shared.clone(), peer.clone(), state.clone());
                    tokio::spawn(serve_stream(shared, request, respond, peer, state));
                }
                _ => return,
            },
            changed = state.changed() => {
                if changed.is_err() || *state.borrow() == STOPPED {
                    return;
                }
                connection.graceful_shutdown();
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
    /// Sends one framed message as the client's flow-control window lets it through: h2
    /// would otherwise queue every reply for a client that does not read them, without bound.
    /// While this waits the stream reads no further message, so the client is held back too.
    async fn send(&mut self, mut framed: Bytes) -> Result<(), h2::Error> {
        let send = match &mut self.send {
            Some(send) => send,
            None => {
                let initial = self.call.initial.lock().unwrap().clone();
                let head = grpc::response_head(&initial);
                self.send.insert(self.respond.send_response(head, false)?)
            }
        };
        while !framed.is_empty() {
            send.reserve_capacity(framed.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted?,
                None => return Err(h2::Reason::CANCEL.into()),
            };
            if granted > 0 {
                send.send_data(framed.split_to(granted.min(framed.len())), false)?;
            }
        }
        Ok(())
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
    peer: Arc<str>,
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
        peer,
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
    shared.active.fetch_add(1, Ordering::AcqRel);
    let _active = Active(shared.clone());
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
    if !method.bidi {
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
    loop {
        let next = if method.end_idle_on_drain {
            // The grace period is for streams mid-callback: one waiting for its next message
            // (Envoy waits on the upstream meanwhile) would only hold the drain.
            tokio::select! {
                biased;
                _ = state.wait_for(|state| *state != SERVING) => {
                    return Some(Status::new(grpc::UNAVAILABLE, "server is draining"));
                }
                next = messages.next() => next,
            }
        } else {
            messages.next().await
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

/// Waits for the answer Python completes elsewhere (on its event loop); None when the
/// client resets the stream first.
async fn wait(reply: &mut Reply, events: &mut mpsc::UnboundedReceiver<Event>) -> Option<Resumed> {
    let event = tokio::select! {
        event = events.recv() => event,
        _ = reply.reset() => return None,
    };
    Some(match event {
        Some(Event::Reply(Some(framed))) => Resumed::Reply(framed),
        Some(Event::Reply(None)) => Resumed::Nothing,
        Some(Event::Finish(status)) => Resumed::Finish(status),
        None => Resumed::Finish(Status::new(grpc::INTERNAL, "internal error")),
    })
}
