//! The gRPC-over-HTTP/2 rules the transport writes and reads: status codes, the
//! `grpc-message` percent-encoding, `grpc-timeout`, and the 5-byte message prefix.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use std::time::Duration;

pub const OK: u32 = 0;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const UNIMPLEMENTED: u32 = 12;

/// A gRPC status with the metadata that goes with it in the trailers.
pub struct Status {
    pub code: u32,
    pub message: String,
}

impl Status {
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }
}

/// `grpc-message` is percent-encoded: everything outside printable ASCII, and `%` itself.
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses `grpc-timeout` (`<digits><unit>`, at most 8 digits); None when malformed.
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(amount.saturating_mul(3600)),
        b'M' => Duration::from_secs(amount.saturating_mul(60)),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Adds `metadata` to `headers`; `-bin` values are base64-encoded on the wire.
pub fn add_metadata(headers: &mut HeaderMap, metadata: &[(String, Vec<u8>)]) {
    for (key, value) in metadata {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
            continue;
        };
        let encoded;
        let raw: &[u8] = if key.ends_with("-bin") {
            encoded = base64_encode(value);
            encoded.as_bytes()
        } else {
            value
        };
        if let Ok(value) = HeaderValue::from_bytes(raw) {
            headers.append(name, value);
        }
    }
}

fn status_headers(headers: &mut HeaderMap, status: &Status) {
    headers.insert("grpc-status", HeaderValue::from(status.code));
    if !status.message.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&percent_encode(&status.message)) {
            headers.insert("grpc-message", value);
        }
    }
}

/// The response headers that open a reply stream, with the call's initial metadata.
pub fn response_head(metadata: &[(String, Vec<u8>)]) -> Response<()> {
    let mut response = Response::new(());
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    add_metadata(headers, metadata);
    response
}

/// A trailers-only response: the status in the one HEADERS frame that ends the stream.
pub fn trailers_only(
    status: &Status,
    initial: &[(String, Vec<u8>)],
    trailing: &[(String, Vec<u8>)],
) -> Response<()> {
    let mut response = response_head(initial);
    add_metadata(response.headers_mut(), trailing);
    status_headers(response.headers_mut(), status);
    response
}

/// The trailers that end a stream whose headers were sent already.
pub fn trailers(status: &Status, trailing: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    add_metadata(&mut headers, trailing);
    status_headers(&mut headers, status);
    headers
}

/// One message with its prefix: flag 0 (not compressed), big-endian length, the bytes.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// What the buffer holds at its front.
pub enum Parsed {
    /// Not a whole prefix or message yet.
    Incomplete,
    Message(Bytes),
    /// A message the transport refuses, with the status to end the stream with.
    Refused(Status),
}

/// Takes the next message off `buffer` once it is complete; refuses compressed messages and
/// messages larger than `max` from their prefix alone, before their bytes arrive.
pub fn next_message(buffer: &mut BytesMut, max: usize) -> Parsed {
    if buffer.len() < 5 {
        return Parsed::Incomplete;
    }
    let flag = buffer[0];
    let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if flag != 0 {
        return Parsed::Refused(Status::new(
            UNIMPLEMENTED,
            "compressed messages are not supported",
        ));
    }
    if length > max {
        return Parsed::Refused(Status::new(
            RESOURCE_EXHAUSTED,
            format!("Received message larger than max ({length} vs. {max})"),
        ));
    }
    if buffer.len() < 5 + length {
        buffer.reserve(5 + length - buffer.len());
        return Parsed::Incomplete;
    }
    buffer.advance(5);
    Parsed::Message(buffer.split_to(length).freeze())
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Unpadded base64, as gRPC writes `-bin` metadata.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..=chunk.len() {
            out.push(BASE64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes padded or unpadded base64; None when malformed.
pub fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    let text: Vec<u8> = text.iter().copied().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_printable_ascii() {
        assert_eq!(percent_encode("a b%c\nü"), "a b%25c%0A%C3%BC");
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"x"), None);
        assert_eq!(parse_timeout(b"123456789S"), None);
    }

    #[test]
    fn base64_round_trip() {
        for data in [&b""[..], b"a", b"ab", b"abc", b"\x00\xff\x10\x20"] {
            assert_eq!(base64_decode(base64_encode(data).as_bytes()).unwrap(), data);
        }
        assert_eq!(base64_encode(b"ab"), "YWI");
    }

    #[test]
    fn framing() {
        let mut buffer = BytesMut::from(&frame(b"hello")[..]);
        buffer.extend_from_slice(&[1, 0, 0, 0, 0]);
        assert!(matches!(next_message(&mut buffer, 10), Parsed::Message(m) if &m[..] == b"hello"));
        assert!(
            matches!(next_message(&mut buffer, 10), Parsed::Refused(s) if s.code == UNIMPLEMENTED)
        );
    }
}
