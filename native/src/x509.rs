//! What gRPC's `auth_context()` says of a client certificate, read from its DER: the subject
//! as OpenSSL prints it (RFC 2253), the first common name, the subject alternative names by
//! kind, and the certificate as PEM. Only the few fields those need are parsed; a
//! certificate here was verified by rustls already.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The `auth_context()` entries of a client certificate, in the order gRPC lists them.
pub fn properties(der: &[u8]) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let Some(cert) = Fields::parse(der) else {
        // Unparsable here but accepted by rustls: keep what is known to be true.
        return vec![("x509_pem_cert", vec![pem(der)])];
    };
    let mut out = vec![
        ("x509_subject", vec![cert.subject]),
        ("x509_common_name", vec![cert.common_name]),
        ("x509_pem_cert", vec![pem(der)]),
    ];
    // Each name under `x509_subject_alternative_name` and under its kind's key, the keys in
    // the order their first name comes, as gRPC adds them.
    let mut uris = 0;
    let mut spiffe = None;
    for (tag, value) in &cert.sans {
        let (kind, text) = match tag {
            0x82 => (Some("peer_dns"), value.to_vec()),
            0x86 => {
                uris += 1;
                if is_spiffe_id(value) {
                    spiffe = Some(value.to_vec());
                }
                (Some("peer_uri"), value.to_vec())
            }
            0x87 => match ip_text(value) {
                Some(ip) => (Some("peer_ip"), ip.into_bytes()),
                None => continue,
            },
            0x81 => (Some("peer_email"), value.to_vec()),
            _ => (None, b"other types of SAN".to_vec()),
        };
        add(&mut out, "x509_subject_alternative_name", text.clone());
        if let Some(kind) = kind {
            add(&mut out, kind, text);
        }
    }
    if let (1, Some(spiffe)) = (uris, spiffe) {
        out.push(("peer_spiffe_id", vec![spiffe]));
    }
    out
}

fn add(out: &mut Vec<(&'static str, Vec<Vec<u8>>)>, key: &'static str, value: Vec<u8>) {
    match out.iter_mut().find(|(k, _)| *k == key) {
        Some((_, values)) => values.push(value),
        None => out.push((key, vec![value])),
    }
}

/// A SPIFFE ID as gRPC takes one: `spiffe://` a trust domain and a path.
fn is_spiffe_id(uri: &[u8]) -> bool {
    let Some(rest) = uri.strip_prefix(b"spiffe://") else {
        return false;
    };
    let Some(slash) = rest.iter().position(|&b| b == b'/') else {
        return false;
    };
    uri.len() <= 2048
        && slash > 0
        && rest.len() > slash + 1
        && !uri.contains(&b'#')
        && !uri.contains(&b'?')
}

/// The fields of a certificate that `properties` reports.
struct Fields<'a> {
    subject: Vec<u8>,
    common_name: Vec<u8>,
    sans: Vec<(u8, &'a [u8])>,
}

impl<'a> Fields<'a> {
    fn parse(der: &'a [u8]) -> Option<Self> {
        let certificate = Der(der).next(0x30)?;
        let mut tbs = Der(Der(certificate).next(0x30)?);
        if tbs.peek() == Some(0xa0) {
            tbs.any()?; // version
        }
        tbs.any()?; // serial number
        tbs.any()?; // signature algorithm
        tbs.any()?; // issuer
        tbs.any()?; // validity
        let subject = tbs.next(0x30)?;
        tbs.any()?; // subject public key info
        let mut sans = Vec::new();
        while let Some((tag, content, _)) = tbs.any() {
            if tag != 0xa3 {
                continue; // issuer and subject unique IDs
            }
            let mut extensions = Der(Der(content).next(0x30)?);
            while let Some(extension) = extensions.next(0x30) {
                let mut extension = Der(extension);
                let oid = extension.next(0x06)?;
                if oid != [0x55, 0x1d, 0x11] {
                    continue;
                }
                if extension.peek() == Some(0x01) {
                    extension.any()?; // critical
                }
                let mut names = Der(Der(extension.next(0x04)?).next(0x30)?);
                while let Some((tag, value, _)) = names.any() {
                    sans.push((tag, value));
                }
            }
        }
        let (subject, common_name) = name(subject)?;
        Some(Fields {
            subject,
            common_name,
            sans,
        })
    }
}

/// A DER reader over one level of a structure.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The next element: its tag, its content and all of its bytes.
    fn any(&mut self) -> Option<(u8, &'a [u8], &'a [u8])> {
        let data = self.0;
        let tag = *data.first()?;
        let first = *data.get(1)?;
        let (length, header) = if first < 0x80 {
            (first as usize, 2)
        } else {
            let count = (first & 0x7f) as usize;
            if count == 0 || count > 4 {
                return None;
            }
            let bytes = data.get(2..2 + count)?;
            (
                bytes.iter().fold(0usize, |n, &b| (n << 8) | b as usize),
                2 + count,
            )
        };
        let end = header.checked_add(length)?;
        let whole = data.get(..end)?;
        self.0 = &data[end..];
        Some((tag, &whole[header..], whole))
    }

    /// The content of the next element, which must have tag `tag`.
    fn next(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.any()? {
            (found, content, _) if found == tag => Some(content),
            _ => None,
        }
    }
}

/// The short names OpenSSL prints for the attributes it knows (by the OID's DER content).
const SHORT_NAMES: &[(&[u8], &str)] = &[
    (&[0x55, 0x04, 0x03], "CN"),
    (&[0x55, 0x04, 0x04], "SN"),
    (&[0x55, 0x04, 0x05], "serialNumber"),
    (&[0x55, 0x04, 0x06], "C"),
    (&[0x55, 0x04, 0x07], "L"),
    (&[0x55, 0x04, 0x08], "ST"),
    (&[0x55, 0x04, 0x09], "street"),
    (&[0x55, 0x04, 0x0a], "O"),
    (&[0x55, 0x04, 0x0b], "OU"),
    (&[0x55, 0x04, 0x0c], "title"),
    (&[0x55, 0x04, 0x0d], "description"),
    (&[0x55, 0x04, 0x0f], "businessCategory"),
    (&[0x55, 0x04, 0x11], "postalCode"),
    (&[0x55, 0x04, 0x29], "name"),
    (&[0x55, 0x04, 0x2a], "GN"),
    (&[0x55, 0x04, 0x2b], "initials"),
    (&[0x55, 0x04, 0x2c], "generationQualifier"),
    (&[0x55, 0x04, 0x2e], "dnQualifier"),
    (&[0x55, 0x04, 0x41], "pseudonym"),
    (&[0x55, 0x04, 0x48], "role"),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
        "emailAddress",
    ),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
        "UID",
    ),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
        "DC",
    ),
];

const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// A Name as OpenSSL's `X509_NAME_print_ex(..., XN_FLAG_RFC2253)` prints it (what gRPC
/// reports as `x509_subject`), and its first common name.
fn name(content: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    // (set index, type, value TLV) in the order the certificate holds them.
    let mut entries = Vec::new();
    let mut rdns = Der(content);
    let mut index = 0;
    while let Some(set) = rdns.next(0x31) {
        let mut set = Der(set);
        while let Some(pair) = set.next(0x30) {
            let mut pair = Der(pair);
            let oid = pair.next(0x06)?;
            let value = pair.any()?;
            entries.push((index, oid, value));
        }
        index += 1;
    }
    let common_name = entries
        .iter()
        .find(|(_, oid, _)| *oid == COMMON_NAME)
        .and_then(|(_, _, value)| text(value.0, value.1))
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut previous = None;
    for (set, oid, (tag, content, whole)) in entries.iter().rev() {
        if let Some(previous) = previous {
            out.push(if previous == *set { b'+' } else { b',' });
        }
        previous = Some(*set);
        let known = SHORT_NAMES.iter().find(|(o, _)| o == oid);
        match known {
            Some((_, short)) => out.extend_from_slice(short.as_bytes()),
            None => out.extend_from_slice(dotted(oid).as_bytes()),
        }
        out.push(b'=');
        match text(*tag, content).filter(|_| known.is_some()) {
            Some(value) => escape(&value, &mut out),
            None => {
                out.push(b'#');
                for b in *whole {
                    out.extend_from_slice(format!("{b:02X}").as_bytes());
                }
            }
        }
    }
    Some((out, common_name))
}

/// A string value as UTF-8; None for a type that is not a string.
fn text(tag: u8, content: &[u8]) -> Option<Vec<u8>> {
    Some(match tag {
        // UTF8String, NumericString, PrintableString, IA5String, VisibleString
        0x0c | 0x12 | 0x13 | 0x16 | 0x1a => content.to_vec(),
        // T61String, read as Latin-1 as OpenSSL does
        0x14 => content
            .iter()
            .map(|&b| b as char)
            .collect::<String>()
            .into_bytes(),
        // BMPString (UCS-2) and UniversalString (UCS-4), big-endian
        0x1e | 0x1c => {
            let width = if tag == 0x1e { 2 } else { 4 };
            if content.len() % width != 0 {
                return None;
            }
            content
                .chunks(width)
                .map(|c| c.iter().fold(0u32, |n, &b| (n << 8) | u32::from(b)))
                .map(|c| char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect::<String>()
                .into_bytes()
        }
        _ => return None,
    })
}

/// RFC 2253 escaping as OpenSSL does it: the special characters with a backslash, a
/// leading `#` and a leading or trailing space too, control and non-ASCII bytes as `\XX`.
fn escape(value: &[u8], out: &mut Vec<u8>) {
    let last = value.len().saturating_sub(1);
    for (i, &b) in value.iter().enumerate() {
        match b {
            b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';' => out.extend_from_slice(&[b'\\', b]),
            b'#' if i == 0 => out.extend_from_slice(b"\\#"),
            b' ' if i == 0 || i == last => out.extend_from_slice(b"\\ "),
            0..=0x1f | 0x7f..=0xff => out.extend_from_slice(format!("\\{b:02X}").as_bytes()),
            _ => out.push(b),
        }
    }
}

fn dotted(oid: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut n: u64 = 0;
    for &b in oid {
        n = (n << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (n / 40).min(2);
                parts.push(first);
                parts.push(n - first * 40);
            } else {
                parts.push(n);
            }
            n = 0;
        }
    }
    parts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn ip_text(octets: &[u8]) -> Option<String> {
    Some(match octets.len() {
        4 => Ipv4Addr::from(<[u8; 4]>::try_from(octets).ok()?).to_string(),
        16 => Ipv6Addr::from(<[u8; 16]>::try_from(octets).ok()?).to_string(),
        _ => return None,
    })
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The certificate as PEM, as OpenSSL writes it: padded base64 in lines of 64.
pub fn pem(der: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            encoded.push(if i <= chunk.len() {
                BASE64[((n >> (18 - 6 * i)) & 63) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    for line in encoded.chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_follows_openssl() {
        let mut out = Vec::new();
        escape("#a,b+\"c\"\\<>; é ".as_bytes(), &mut out);
        assert_eq!(
            out,
            b"\\#a\\,b\\+\\\"c\\\"\\\\\\<\\>\\; \\C3\\A9\\ ".to_vec()
        );
    }

    #[test]
    fn oids_print_dotted() {
        assert_eq!(dotted(&[0x2a, 0x03, 0x04]), "1.2.3.4");
        assert_eq!(dotted(&[0x55, 0x1d, 0x11]), "2.5.29.17");
    }

    #[test]
    fn pem_pads_and_wraps() {
        let wrapped = pem(&[0u8; 49]);
        let text = std::str::from_utf8(&wrapped).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines[2], "AA==");
        assert!(pem(b"ab").windows(4).any(|w| w == b"YWI="));
    }
}
