//! calloutkit's native gRPC transport: HTTP/2 (h2 on tokio, TLS by rustls) in one thread per
//! server, calling Python once per message. The Python side is `calloutkit.runtime._native`;
//! the module is `calloutkit_native`, the calloutkit-native distribution (native/pyproject.toml).

mod grpc;
mod tls;
mod transport;

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};
use socket2::{Domain, Socket, Type};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::{mpsc, watch};

/// What Python hands back to a stream waiting on it.
pub enum Event {
    Reply(Option<Bytes>),
    Finish(grpc::Status),
}

type Metadata = Vec<(String, Vec<u8>)>;

pub struct CallState {
    pub events: mpsc::UnboundedSender<Event>,
    pub metadata: Metadata,
    pub peer: Arc<str>,
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
        self.state.peer.to_string()
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

#[pymethods]
impl Server {
    /// ``methods`` maps each path (``/package.Service/Method``) to ``(bidi, handler,
    /// end_idle_on_drain)``: a bidi handler is called with the `Call` and returns the stream
    /// object (None refuses the stream with UNAVAILABLE); a unary one is called with the
    /// `Call` and the request. With ``end_idle_on_drain``, a stream waiting for its next
    /// message when the drain begins is ended with UNAVAILABLE.
    #[new]
    fn new(
        methods: &Bound<'_, PyDict>,
        max_message_size: usize,
        max_concurrent_streams: u32,
    ) -> PyResult<Self> {
        let mut table = HashMap::new();
        for (path, entry) in methods.iter() {
            let (bidi, handler, end_idle_on_drain): (bool, Py<PyAny>, bool) = entry.extract()?;
            let method = transport::Method {
                bidi,
                handler,
                end_idle_on_drain,
            };
            table.insert(path.extract::<String>()?, method);
        }
        if max_concurrent_streams == 0 {
            return Err(PyValueError::new_err("max_concurrent_streams must be >= 1"));
        }
        Ok(Server {
            shared: Arc::new(transport::Shared {
                methods: table,
                max_message_size,
                max_concurrent_streams,
                active: AtomicUsize::new(0),
            }),
            listeners: Vec::new(),
            state: watch::channel(transport::SERVING).0,
            thread: None,
        })
    }

    /// Binds a listener (TLS when a certificate chain and key are given); returns its port.
    #[pyo3(signature = (host, port, reuse_port=false, cert_chain=None, private_key=None))]
    fn listen(
        &mut self,
        host: &str,
        port: u16,
        reuse_port: bool,
        cert_chain: Option<&[u8]>,
        private_key: Option<&[u8]>,
    ) -> PyResult<u16> {
        if self.thread.is_some() {
            return Err(PyRuntimeError::new_err("server already started"));
        }
        let tls = match (cert_chain, private_key) {
            (Some(chain), Some(key)) => {
                Some(tls::acceptor(chain, key).map_err(PyValueError::new_err)?)
            }
            _ => None,
        };
        let listener = bind(host, port, reuse_port).map_err(|e| match e.raw_os_error() {
            // OSError(errno, strerror), as Python's own socket errors: the runtime's message
            // is then the same on both transports.
            Some(code) => {
                let text = e.to_string();
                let suffix = format!(" (os error {code})");
                PyOSError::new_err((code, text.trim_end_matches(&suffix).to_owned()))
            }
            None => PyOSError::new_err(e.to_string()),
        })?;
        let bound = listener.local_addr()?.port();
        self.listeners.push((listener, tls));
        Ok(bound)
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
    }

    /// Streams (and unary calls) in flight.
    #[getter]
    fn active_streams(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server dropped without `stop` must not keep its thread serving; it cannot be
        // joined here, where the GIL may be held and the thread may be waiting for it.
        self.state.send_replace(transport::STOPPED);
    }
}

#[pymodule]
fn calloutkit_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Server>()?;
    m.add_class::<Call>()?;
    Ok(())
}
