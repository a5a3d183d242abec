//! calloutkit's native gRPC transport: HTTP/2 (h2 on tokio, TLS by rustls) in one thread per
//! server, calling Python once per message. The Python side is `calloutkit.runtime._native`;
//! the module is `calloutkit_native`, the calloutkit-native distribution (native/pyproject.toml).

mod grpc;
mod tls;
mod transport;
mod x509;

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use socket2::{Domain, Socket, Type};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// What Python hands back to a stream waiting on it.
pub enum Event {
    Reply(Option<Bytes>),
    /// A message of a server-streaming call, not tied to a request.
    Send(Bytes),
    Finish(grpc::Status),
}

type Metadata = Vec<(String, Vec<u8>)>;

/// What every call of one connection shares: who the peer is, made once per connection.
pub struct Connection {
    /// As gRPC writes it: `ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, `unix:`.
    pub peer: String,
    pub auth: tls::AuthContext,
}

pub struct CallState {
    pub events: mpsc::UnboundedSender<Event>,
    pub metadata: Metadata,
    pub connection: Arc<Connection>,
    pub deadline: Option<Instant>,
    pub initial: Mutex<Metadata>,
    pub trailing: Mutex<Metadata>,
}

/// One call (a stream or a unary call) as Python sees it: its request metadata, and the way
/// back for an answer completed away from the transport thread. Safe from any thread.
#[pyclass(frozen, module = "calloutkit_native")]
pub struct Call {
    state: Arc<CallState>,
}

fn metadata_from(items: &Bound<'_, PyAny>) -> PyResult<Metadata> {
    let mut out = Vec::new();
    for item in items.try_iter()? {
        let (key, value): (String, Bound<'_, PyAny>) = item?.extract()?;
        let value = if let Ok(text) = value.cast::<PyString>() {
            text.to_str()?.as_bytes().to_vec()
        } else {
            value.extract::<Vec<u8>>()?
        };
        out.push((key.to_ascii_lowercase(), value));
    }
    Ok(out)
}

#[pymethods]
impl Call {
    /// The request's metadata: ``(key, value)`` pairs, bytes values for ``-bin`` keys.
    fn invocation_metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let mut items = Vec::with_capacity(self.state.metadata.len());
        for (key, value) in &self.state.metadata {
            let value: Bound<'py, PyAny> = if key.ends_with("-bin") {
                PyBytes::new(py, value).into_any()
            } else {
                PyString::new(py, &String::from_utf8_lossy(value)).into_any()
            };
            items.push(PyTuple::new(
                py,
                [PyString::new(py, key).into_any(), value],
            )?);
        }
        PyTuple::new(py, items)
    }

    fn peer(&self) -> String {
        self.state.connection.peer.clone()
    }

    /// The connection's security, in the shape of grpc's ``auth_context()``: property name
    /// to a list of bytes values (the client certificate's identity under mTLS).
    fn auth_context<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (key, values) in &self.state.connection.auth {
            let values = values.iter().map(|value| PyBytes::new(py, value));
            out.set_item(key, PyList::new(py, values)?)?;
        }
        Ok(out)
    }

    /// Seconds left before the client's deadline; None without one.
    fn time_remaining(&self) -> Option<f64> {
        self.state
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64())
    }

    /// Completes the answer the transport is waiting for: ``data`` is sent (None sends
    /// nothing) and the stream reads on; a unary call ends OK with it.
    #[pyo3(signature = (data))]
    fn reply(&self, data: Option<&[u8]>) {
        let _ = self.state.events.send(Event::Reply(data.map(grpc::frame)));
    }

    /// Sends ``data`` on a server-streaming call, at once: the way such a call (health
    /// ``Watch``) pushes a message that no request asked for. Safe from any thread.
    fn send(&self, data: &[u8]) {
        let _ = self.state.events.send(Event::Send(grpc::frame(data)));
    }

    /// Ends the call with a gRPC status in place of the answer the transport waits for.
    #[pyo3(signature = (code, message = String::new()))]
    fn finish(&self, code: u32, message: String) {
        let _ = self
            .state
            .events
            .send(Event::Finish(grpc::Status::new(code, message)));
    }

    /// Metadata for the response headers; it goes out with the first reply or the status.
    fn set_initial_metadata(&self, metadata: &Bound<'_, PyAny>) -> PyResult<()> {
        *self.state.initial.lock().unwrap() = metadata_from(metadata)?;
        Ok(())
    }

    /// Metadata for the trailers, beside the status.
    fn set_trailing_metadata(&self, metadata: &Bound<'_, PyAny>) -> PyResult<()> {
        *self.state.trailing.lock().unwrap() = metadata_from(metadata)?;
        Ok(())
    }
}

/// A gRPC server on its own transport thread.
#[pyclass(module = "calloutkit_native")]
pub struct Server {
    shared: Arc<transport::Shared>,
    listeners: Vec<transport::Listener>,
    tls: Option<Arc<tls::Reloadable>>,
    /// Socket files this server made, with their device and inode: removed when it stops,
    /// unless something else has replaced them since.
    unix_files: Vec<(PathBuf, u64, u64)>,
    state: watch::Sender<u8>,
    thread: Option<JoinHandle<()>>,
}

fn bind(host: &str, port: u16, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let mut last = None;
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    for addr in addrs {
        let attempt = (|| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            if reuse_port {
                socket.set_reuse_port(true)?;
            }
            if addr.is_ipv6() {
                let _ = socket.set_only_v6(false);
            }
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(std::net::TcpListener::from(socket))
        })();
        match attempt {
            Ok(listener) => return Ok(listener),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no address to bind")))
}

fn bind_unix(path: &Path) -> std::io::Result<(UnixListener, (PathBuf, u64, u64))> {
    // The runtime has checked that no server listens there: a socket file left behind by
    // one that died is replaced, as gRPC does.
    if let Ok(found) = std::fs::symlink_metadata(path) {
        if found.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    let made = std::fs::metadata(path)?;
    Ok((listener, (path.to_owned(), made.dev(), made.ino())))
}

fn os_error(e: std::io::Error) -> PyErr {
    match e.raw_os_error() {
        // OSError(errno, strerror), as Python's own socket errors: the runtime's message
        // is then the same on both transports.
        Some(code) => {
            let text = e.to_string();
            let suffix = format!(" (os error {code})");
            PyOSError::new_err((code, text.trim_end_matches(&suffix).to_owned()))
        }
        None => PyOSError::new_err(e.to_string()),
    }
}

#[pymethods]
impl Server {
    /// ``methods`` maps each path (``/package.Service/Method``) to ``(kind, handler, counted,
    /// end_idle_on_drain, idle)``:
    ///
    /// - ``"bidi"``: the handler is called with the `Call` and returns the stream object
    ///   (None refuses the stream with UNAVAILABLE), whose ``on_message`` answers each request;
    /// - ``"unary"``: the handler is called with the `Call` and the request;
    /// - ``"server_streaming"``: the handler is called with the `Call` and the request, sends
    ///   its messages with `Call.send` (from any thread) and ends with `Call.finish`; it
    ///   returns an object whose ``on_end`` runs when the call ends, or None.
    ///
    /// A ``counted`` call counts in `active_streams` (what a drain waits for). With
    /// ``end_idle_on_drain``, a stream waiting for its next message when the drain begins is
    /// ended with UNAVAILABLE. ``idle`` is ``(seconds, message)``: a bidi stream waiting
    /// that long for its next message is ended with DEADLINE_EXCEEDED and that message.
    ///
    /// With ``max_connection_age`` (seconds), each connection is sent GOAWAY after that long
    /// (±10%) and closed ``max_connection_age_grace`` seconds later, as grpcio's
    /// ``grpc.max_connection_age_ms`` does.
    #[new]
    #[pyo3(signature = (methods, max_message_size, max_concurrent_streams,
                        max_connection_age=None, max_connection_age_grace=0.0))]
    fn new(
        methods: &Bound<'_, PyDict>,
        max_message_size: usize,
        max_concurrent_streams: u32,
        max_connection_age: Option<f64>,
        max_connection_age_grace: f64,
    ) -> PyResult<Self> {
        let mut table = HashMap::new();
        for (path, entry) in methods.iter() {
            type Entry = (String, Py<PyAny>, bool, bool, Option<(f64, String)>);
            let (kind, handler, counted, end_idle_on_drain, idle): Entry = entry.extract()?;
            let kind = match kind.as_str() {
                "unary" => transport::Kind::Unary,
                "server_streaming" => transport::Kind::ServerStreaming,
                "bidi" => transport::Kind::Bidi,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "unknown method kind {other}"
                    )))
                }
            };
            let idle = match idle {
                Some((seconds, message)) => Some((
                    Duration::try_from_secs_f64(seconds)
                        .map_err(|e| PyValueError::new_err(format!("idle timeout: {e}")))?,
                    message,
                )),
                None => None,
            };
            let method = transport::Method {
                kind,
                handler,
                counted,
                end_idle_on_drain,
                idle,
            };
            table.insert(path.extract::<String>()?, method);
        }
        if max_concurrent_streams == 0 {
            return Err(PyValueError::new_err("max_concurrent_streams must be >= 1"));
        }
        let seconds = |value: f64, what: &str| {
            Duration::try_from_secs_f64(value)
                .map_err(|_| PyValueError::new_err(format!("{what} must be >= 0 seconds")))
        };
        let max_connection_age = match max_connection_age {
            Some(age) if age > 0.0 => Some(seconds(age, "max_connection_age")?),
            Some(age) => {
                return Err(PyValueError::new_err(format!(
                    "max_connection_age must be > 0 seconds, got {age}"
                )))
            }
            None => None,
        };
        let max_connection_age_grace =
            seconds(max_connection_age_grace, "max_connection_age_grace")?;
        Ok(Server {
            shared: Arc::new(transport::Shared {
                methods: table,
                max_message_size,
                max_concurrent_streams,
                max_connection_age,
                max_connection_age_grace,
                active: AtomicUsize::new(0),
            }),
            listeners: Vec::new(),
            tls: None,
            unix_files: Vec::new(),
            state: watch::channel(transport::SERVING).0,
            thread: None,
        })
    }

    /// Binds a listener (TLS when a certificate chain and key are given, asking clients for
    /// a certificate from ``client_ca`` when given); returns its port, 0 for a unix socket
    /// (``host`` ``unix:/PATH``).
    #[pyo3(signature = (host, port, reuse_port=false, cert_chain=None, private_key=None,
                        client_ca=None, require_client_auth=false))]
    #[allow(clippy::too_many_arguments)]
    fn listen(
        &mut self,
        host: &str,
        port: u16,
        reuse_port: bool,
        cert_chain: Option<&[u8]>,
        private_key: Option<&[u8]>,
        client_ca: Option<&[u8]>,
        require_client_auth: bool,
    ) -> PyResult<u16> {
        if self.thread.is_some() {
            return Err(PyRuntimeError::new_err("server already started"));
        }
        let tls = match (cert_chain, private_key) {
            (Some(chain), Some(key)) => Some(Arc::new(
                tls::Reloadable::new(chain, key, client_ca, require_client_auth)
                    .map_err(PyValueError::new_err)?,
            )),
            _ => None,
        };
        let (socket, bound) = match host.strip_prefix("unix:") {
            Some(path) => {
                let (listener, file) = bind_unix(Path::new(path)).map_err(os_error)?;
                self.unix_files.push(file);
                (transport::Socket::Unix(listener), 0)
            }
            None => {
                let listener = bind(host, port, reuse_port).map_err(os_error)?;
                let bound = listener.local_addr()?.port();
                (transport::Socket::Tcp(listener), bound)
            }
        };
        if tls.is_some() {
            self.tls.clone_from(&tls);
        }
        self.listeners.push((socket, tls));
        Ok(bound)
    }

    /// New TLS material for the connections accepted from now on; those open keep theirs.
    /// ValueError when rustls cannot use it: the material in use stays.
    #[pyo3(signature = (cert_chain, private_key, client_ca=None))]
    fn reload_tls(
        &self,
        cert_chain: &[u8],
        private_key: &[u8],
        client_ca: Option<&[u8]>,
    ) -> PyResult<()> {
        let Some(tls) = &self.tls else {
            return Err(PyRuntimeError::new_err("no TLS listener"));
        };
        tls.reload(cert_chain, private_key, client_ca)
            .map_err(PyValueError::new_err)
    }

    /// Starts the transport thread on the listeners bound so far.
    fn start(&mut self) -> PyResult<()> {
        if self.thread.is_some() {
            return Err(PyRuntimeError::new_err("server already started"));
        }
        let listeners = std::mem::take(&mut self.listeners);
        let shared = self.shared.clone();
        let state = self.state.subscribe();
        let thread = std::thread::Builder::new()
            .name("calloutkit-transport".into())
            .spawn(move || transport::run(listeners, shared, state))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Sends GOAWAY on every open connection; streams in flight go on.
    fn drain(&self) {
        self.state.send_if_modified(|state| {
            let changed = *state == transport::SERVING;
            if changed {
                *state = transport::DRAINING;
            }
            changed
        });
    }

    /// Closes every connection, cancelling what is left, and waits for the thread.
    fn stop(&mut self, py: Python<'_>) {
        self.state.send_replace(transport::STOPPED);
        if let Some(thread) = self.thread.take() {
            py.detach(|| {
                let _ = thread.join();
            });
        }
        self.listeners.clear();
        self.remove_unix_files();
    }

    /// Streams (and unary calls) in flight.
    #[getter]
    fn active_streams(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }
}

impl Server {
    fn remove_unix_files(&mut self) {
        for (path, dev, ino) in self.unix_files.drain(..) {
            // Another server may have taken the path since (after refusing to share a live
            // one, it can only be one that found ours gone): its file stays.
            let ours = std::fs::symlink_metadata(&path)
                .is_ok_and(|found| found.dev() == dev && found.ino() == ino);
            if ours {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server dropped without `stop` must not keep its thread serving; it cannot be
        // joined here, where the GIL may be held and the thread may be waiting for it.
        self.state.send_replace(transport::STOPPED);
        self.remove_unix_files();
    }
}

#[pymodule]
fn calloutkit_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Server>()?;
    m.add_class::<Call>()?;
    Ok(())
}
