//! A fault-injecting HTTP/1.1 proxy for the S3 tests (std only, threads).
//!
//! It listens on 127.0.0.1 at a free port and forwards every connection to
//! a real server byte for byte, so signatures made for the proxy's address
//! (the client signs the `Host` header it sends, which the proxy does not
//! touch) still check out at s3s-fs. Each request is parsed (head, then a
//! `Content-Length` or chunked body) so the proxy can decide per request,
//! keep-alive included, whether to forward it or to answer it itself with
//! `503 Slow Down` and an S3 `SlowDown` error body, the way S3 throttles.
//! An answered request never reaches the server, so a retry of it is never
//! a second attempt of something the server already did.
//!
//! It can also lose a reply: forward one chosen request (the server does
//! the work) and answer it `503` itself, or never answer it, so the client
//! sees a failure of a request the server applied ([`Faults::LoseReply`],
//! [`Faults::HangReply`]), as when a reply is lost on the way back.
//!
//! Responses are relayed raw by a pump thread per connection: HTTP/1.1
//! clients (hyper) do not pipeline, so by the time the next request arrives
//! the previous response has been relayed completely and an injected answer
//! cannot interleave with it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Which requests the proxy answers with 503 instead of forwarding them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Faults {
    /// Forward everything.
    None,
    /// Answer every n-th request (n >= 1; counted over all connections).
    EveryNth(u64),
    /// Forward the first n requests, answer every later one.
    AllFrom(u64),
    /// Forward the `nth` (1-based, counted from when these faults were set)
    /// request with this method whose path ends with `path_suffix`, read
    /// the server's reply, drop it and answer `503` instead.
    LoseReply {
        method: &'static str,
        path_suffix: &'static str,
        nth: u64,
    },
    /// Like [`Faults::LoseReply`], but never answer that request at all:
    /// the client times out on a request the server applied.
    HangReply {
        method: &'static str,
        path_suffix: &'static str,
        nth: u64,
    },
}

/// What the proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Forward,
    /// Answer 503 without forwarding.
    Throttle,
    /// Forward, drop the reply, answer 503.
    LoseReply,
    /// Forward, drop the reply, answer nothing.
    HangReply,
}

/// The S3 error body of an injected answer.
pub const SLOW_DOWN_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate. (injected by the memferry test proxy)</Message><RequestId>memferry-fault-proxy</RequestId></Error>";

/// The S3 error body that replaces a reply the proxy dropped.
pub const LOST_REPLY_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>ServiceUnavailable</Code><Message>The server's reply was dropped (injected by the memferry test proxy)</Message><RequestId>memferry-fault-proxy</RequestId></Error>";

struct Shared {
    faults: Mutex<Faults>,
    requests: AtomicU64,
    injected: AtomicU64,
    forwarded: AtomicU64,
    /// Requests matching a LoseReply/HangReply since the faults were set.
    matched: AtomicU64,
    stop: AtomicBool,
}

/// A running proxy; it stops when dropped.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy in front of `127.0.0.1:upstream`.
    pub fn start(upstream: u16, faults: Faults) -> Self {
        if let Faults::EveryNth(0) = faults {
            panic!("Faults::EveryNth needs n >= 1");
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            faults: Mutex::new(faults),
            requests: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            matched: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(client, upstream, &s);
                });
            }
        });
        Self {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// The proxy's endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Changes which requests fail from now on (the counters keep going).
    pub fn set_faults(&self, faults: Faults) {
        let mut f = self.shared.faults.lock().unwrap();
        self.shared.matched.store(0, Ordering::SeqCst);
        *f = faults;
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Requests answered with an injected 503.
    pub fn injected(&self) -> u64 {
        self.shared.injected.load(Ordering::SeqCst)
    }

    /// Requests forwarded to the server.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Decides for request number `n` (1-based).
fn inject(faults: Faults, n: u64) -> bool {
    match faults {
        Faults::None | Faults::LoseReply { .. } | Faults::HangReply { .. } => false,
        Faults::EveryNth(k) => n.is_multiple_of(k),
        Faults::AllFrom(k) => n > k,
    }
}

/// Decides for request number `n` with `method` and `target`; `matched`
/// counts the requests a LoseReply/HangReply fault matches.
fn action(faults: Faults, n: u64, method: &str, target: &str, matched: &AtomicU64) -> Action {
    if inject(faults, n) {
        return Action::Throttle;
    }
    let (m, suffix, nth, act) = match faults {
        Faults::LoseReply {
            method,
            path_suffix,
            nth,
        } => (method, path_suffix, nth, Action::LoseReply),
        Faults::HangReply {
            method,
            path_suffix,
            nth,
        } => (method, path_suffix, nth, Action::HangReply),
        _ => return Action::Forward,
    };
    let path = target.split('?').next().unwrap_or("");
    if method.eq_ignore_ascii_case(m)
        && path.ends_with(suffix)
        && matched.fetch_add(1, Ordering::SeqCst) + 1 == nth
    {
        act
    } else {
        Action::Forward
    }
}

/// Sends `request` to the server on a connection of its own and reads the
/// whole reply, which is dropped.
fn forward_and_drop_reply(upstream: u16, request: &Request) -> std::io::Result<()> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.set_read_timeout(Some(Duration::from_secs(60)))?;
    up.write_all(&request.raw)?;
    // A reply has the shape of a request (a first line, headers, a body by
    // Content-Length or chunks): the same reader takes it in whole.
    read_request(&mut BufReader::new(up.try_clone()?))?;
    Ok(())
}

/// One client connection: requests parsed one by one, forwarded or
/// answered; responses pumped back raw.
fn serve(client: TcpStream, upstream: u16, s: &Shared) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let writer = Arc::new(Mutex::new(client.try_clone()?));
    let mut reader = BufReader::new(client.try_clone()?);
    let mut server: Option<(TcpStream, JoinHandle<()>)> = None;
    let result = loop {
        let request = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let n = s.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let faults = *s.faults.lock().unwrap();
        let act = action(faults, n, &request.method, &request.target, &s.matched);
        if matches!(act, Action::LoseReply | Action::HangReply) {
            s.forwarded.fetch_add(1, Ordering::SeqCst);
            s.injected.fetch_add(1, Ordering::SeqCst);
            if let Err(e) = forward_and_drop_reply(upstream, &request) {
                break Err(e);
            }
            if act == Action::HangReply {
                // Never answer: the client gives up and closes.
                continue;
            }
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nx-amz-request-id: memferry-fault-proxy\r\n\r\n{}",
                LOST_REPLY_BODY.len(),
                LOST_REPLY_BODY
            );
            if let Err(e) = writer.lock().unwrap().write_all(answer.as_bytes()) {
                break Err(e);
            }
            continue;
        }
        if act == Action::Throttle {
            s.injected.fetch_add(1, Ordering::SeqCst);
            let head_only = request.method.eq_ignore_ascii_case("HEAD");
            let answer = format!(
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nx-amz-request-id: memferry-fault-proxy\r\n\r\n{}",
                SLOW_DOWN_BODY.len(),
                if head_only { "" } else { SLOW_DOWN_BODY }
            );
            if let Err(e) = writer.lock().unwrap().write_all(answer.as_bytes()) {
                break Err(e);
            }
            continue;
        }
        s.forwarded.fetch_add(1, Ordering::SeqCst);
        if server.is_none() {
            let up = match TcpStream::connect(("127.0.0.1", upstream)) {
                Ok(u) => u,
                Err(e) => break Err(e),
            };
            let mut from = up.try_clone()?;
            let to = writer.clone();
            let pump = std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            if to.lock().unwrap().write_all(&buf[..k]).is_err() {
                                break;
                            }
                        }
                    }
                }
                // The server closed: so does the client's connection.
                let _ = to.lock().unwrap().shutdown(Shutdown::Both);
            });
            server = Some((up, pump));
        }
        let (up, _) = server.as_mut().expect("connected above");
        if let Err(e) = up.write_all(&request.raw) {
            break Err(e);
        }
    };
    if let Some((up, pump)) = server {
        let _ = up.shutdown(Shutdown::Write);
        let _ = pump.join();
    }
    let _ = writer.lock().unwrap().shutdown(Shutdown::Both);
    result
}

struct Request {
    method: String,
    /// The request target (path and query).
    target: String,
    /// Head and body exactly as received.
    raw: Vec<u8>,
}

/// Reads one request; `None` at a clean end of the connection.
fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut raw = Vec::new();
    let mut line = String::new();
    let mut length = 0usize;
    let mut chunked = false;
    let mut method = String::new();
    let mut target = String::new();
    loop {
        line.clear();
        let k = r.read_line(&mut line)?;
        if k == 0 {
            if raw.is_empty() {
                return Ok(None);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed inside a request head",
            ));
        }
        raw.extend_from_slice(line.as_bytes());
        if method.is_empty() {
            let mut words = line.split(' ');
            method = words.next().unwrap_or("").to_string();
            target = words.next().unwrap_or("").to_string();
            continue;
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "bad Content-Length")
                })?;
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            } else if name.eq_ignore_ascii_case("expect") {
                // Not sent by object_store; the proxy would need to relay
                // the interim 100 before the body.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "Expect: 100-continue is not supported by the test proxy",
                ));
            }
        }
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            raw.extend_from_slice(line.as_bytes());
            let size_text = line.trim_end().split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
            })?;
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 {
                        break;
                    }
                    raw.extend_from_slice(line.as_bytes());
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let at = raw.len();
            raw.resize(at + size + 2, 0); // data and its CRLF
            r.read_exact(&mut raw[at..])?;
        }
    } else if length > 0 {
        let at = raw.len();
        raw.resize(at + length, 0);
        r.read_exact(&mut raw[at..])?;
    }
    Ok(Some(Request {
        method,
        target,
        raw,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_schedule_is_exact() {
        let every3: Vec<bool> = (1..=7).map(|n| inject(Faults::EveryNth(3), n)).collect();
        assert_eq!(every3, [false, false, true, false, false, true, false]);
        assert!((1..=4).all(|n| !inject(Faults::AllFrom(4), n)));
        assert!((5..=9).all(|n| inject(Faults::AllFrom(4), n)));
        assert!((1..=9).all(|n| !inject(Faults::None, n)));
    }

    #[test]
    fn a_lost_reply_hits_only_the_nth_matching_request() {
        let f = Faults::LoseReply {
            method: "PUT",
            path_suffix: "/manifest.json",
            nth: 2,
        };
        let matched = AtomicU64::new(0);
        let acts: Vec<Action> = [
            ("GET", "/b/p/manifest.json"),
            ("PUT", "/b/p/saves/x.json"),
            ("PUT", "/b/p/manifest.json"),
            ("PUT", "/b/p/manifest.json?x-id=PutObject"),
            ("PUT", "/b/p/manifest.json"),
        ]
        .iter()
        .enumerate()
        .map(|(i, (m, t))| action(f, i as u64 + 1, m, t, &matched))
        .collect();
        use Action::{Forward as F, LoseReply as L};
        assert_eq!(acts, [F, F, F, L, F]);
    }
}
