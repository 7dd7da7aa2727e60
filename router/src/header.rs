//! The small versioned header that opens every fabric stream, and the reply that opens the
//! stream's return direction.
//!
//! Wire format (version 1), all integers big-endian:
//!
//! ```text
//! 0      u8   version (1)
//! 1      u8   kind (1 = data)
//! 2..4   u16  body length N (N <= MAX_HEADER_LEN - 4)
//! body:  u8   flags (bit 0: client address present, bit 1: circuit present; others must be 0)
//!        u8   service length L (1..=MAX_NAME_LEN), L bytes UTF-8
//!        u8   hop count H (0..=MAX_HOPS), then H times: u8 length (1..=MAX_NAME_LEN) + bytes
//!        [client]  u8 family (4 | 6), 4 or 16 address bytes, u16 port
//!        [circuit] u8 length (1..=MAX_NAME_LEN) + bytes
//! ```
//!
//! `hops` are the nodes still to visit *after* the receiver: a transit pops the first and
//! forwards; an empty list means the receiver is the destination site. Nothing may follow the
//! body (trailing bytes are malformed). The return direction starts with [`REPLY_OK`] once the
//! site has connected to its backend; failures are stream resets with a [`crate::codes::Code`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, BytesMut};
use topology::{NodeId, ServiceName};

pub const VERSION: u8 = 1;
/// Upper bound on a whole header, prefix included.
pub const MAX_HEADER_LEN: usize = 1280;
/// Upper bound on the remaining hops: a path names at most `topology::MAX_PATH_NODES`, the
/// first hop (the edge's neighbour) is the connection the stream opens on, and the edge itself
/// is not named.
pub const MAX_HOPS: usize = topology::MAX_PATH_NODES - 2;
// The wire format's limit: a change to the path bound is a change of the protocol.
const _: () = assert!(MAX_HOPS == 16);
/// Upper bound on a service, node or circuit name.
pub const MAX_NAME_LEN: usize = 63;
/// Bytes before the body: version, kind, body length.
pub const PREFIX_LEN: usize = 4;
/// The first bytes of a stream's return direction when the site accepted it.
pub const REPLY_OK: [u8; 2] = [VERSION, 0];

const FLAG_CLIENT: u8 = 1;
const FLAG_CIRCUIT: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A client connection carried to a site.
    Data = 1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub service: ServiceName,
    /// Nodes still to visit after the receiver; empty at the destination.
    pub hops: Vec<NodeId>,
    /// The client's address as the edge saw it.
    pub client: Option<SocketAddr>,
    /// The circuit the edge classified the client into, if any.
    pub circuit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header truncated: needed {needed} bytes, had {had}")]
    Truncated { needed: usize, had: usize },
    #[error("unsupported header version {0}")]
    Version(u8),
    #[error("unknown stream kind {0}")]
    Kind(u8),
    #[error("header of {0} bytes is larger than {MAX_HEADER_LEN}")]
    TooLarge(usize),
    #[error("unknown header flags 0x{0:02x}")]
    Flags(u8),
    #[error("bad {field}: {reason}")]
    Field {
        field: &'static str,
        reason: &'static str,
    },
    #[error("{0} trailing bytes after the header body")]
    Trailing(usize),
    #[error("{0} hops (at most {MAX_HOPS})")]
    TooManyHops(usize),
}

impl HeaderError {
    /// The stream reset code for this error.
    pub fn code(&self) -> crate::codes::Code {
        use crate::codes::Code;
        match self {
            HeaderError::Version(_) => Code::UnsupportedVersion,
            HeaderError::TooLarge(_) => Code::HeaderTooLarge,
            _ => Code::MalformedHeader,
        }
    }
}

fn need(buf: &impl Buf, n: usize) -> Result<(), HeaderError> {
    if buf.remaining() < n {
        Err(HeaderError::Truncated {
            needed: n,
            had: buf.remaining(),
        })
    } else {
        Ok(())
    }
}

fn get_name(buf: &mut impl Buf, field: &'static str) -> Result<String, HeaderError> {
    need(buf, 1)?;
    let len = buf.get_u8() as usize;
    if len == 0 || len > MAX_NAME_LEN {
        return Err(HeaderError::Field {
            field,
            reason: "length out of range",
        });
    }
    need(buf, len)?;
    let mut raw = [0u8; MAX_NAME_LEN];
    buf.copy_to_slice(&mut raw[..len]);
    let s = std::str::from_utf8(&raw[..len]).map_err(|_| HeaderError::Field {
        field,
        reason: "not UTF-8",
    })?;
    if s.chars().any(char::is_control) {
        return Err(HeaderError::Field {
            field,
            reason: "control character",
        });
    }
    Ok(s.to_string())
}

fn put_name(out: &mut BytesMut, s: &str) {
    // Lengths are checked by `encode`'s caller-facing validation.
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

impl Header {
    pub fn data(service: ServiceName, hops: Vec<NodeId>, client: Option<SocketAddr>) -> Self {
        Header {
            kind: Kind::Data,
            service,
            hops,
            client,
            circuit: None,
        }
    }

    /// Validates the 4-byte prefix and returns the body length that follows it.
    pub fn body_len(prefix: [u8; PREFIX_LEN]) -> Result<usize, HeaderError> {
        if prefix[0] != VERSION {
            return Err(HeaderError::Version(prefix[0]));
        }
        if prefix[1] != Kind::Data as u8 {
            return Err(HeaderError::Kind(prefix[1]));
        }
        let n = u16::from_be_bytes([prefix[2], prefix[3]]) as usize;
        if n + PREFIX_LEN > MAX_HEADER_LEN {
            return Err(HeaderError::TooLarge(n + PREFIX_LEN));
        }
        Ok(n)
    }

    /// Decodes one header from `buf`, which must hold exactly the header (prefix and body) or
    /// more; consumes the header. Never panics; bounded by [`MAX_HEADER_LEN`].
    pub fn decode(buf: &mut impl Buf) -> Result<Header, HeaderError> {
        need(buf, PREFIX_LEN)?;
        let mut prefix = [0u8; PREFIX_LEN];
        buf.copy_to_slice(&mut prefix);
        let n = Header::body_len(prefix)?;
        need(buf, n)?;
        let mut body = buf.take(n);
        let h = Header::decode_body(&mut body)?;
        if body.remaining() > 0 {
            return Err(HeaderError::Trailing(body.remaining()));
        }
        Ok(h)
    }

    fn decode_body(b: &mut impl Buf) -> Result<Header, HeaderError> {
        need(b, 1)?;
        let flags = b.get_u8();
        if flags & !(FLAG_CLIENT | FLAG_CIRCUIT) != 0 {
            return Err(HeaderError::Flags(flags));
        }
        let service = ServiceName::new(get_name(b, "service")?);
        need(b, 1)?;
        let count = b.get_u8() as usize;
        if count > MAX_HOPS {
            return Err(HeaderError::TooManyHops(count));
        }
        let mut hops = Vec::with_capacity(count);
        for _ in 0..count {
            hops.push(NodeId::new(get_name(b, "hop")?));
        }
        let client = if flags & FLAG_CLIENT != 0 {
            need(b, 1)?;
            let ip = match b.get_u8() {
                4 => {
                    need(b, 4)?;
                    IpAddr::V4(Ipv4Addr::from(b.get_u32()))
                }
                6 => {
                    need(b, 16)?;
                    IpAddr::V6(Ipv6Addr::from(b.get_u128()))
                }
                _ => {
                    return Err(HeaderError::Field {
                        field: "client",
                        reason: "unknown address family",
                    });
                }
            };
            need(b, 2)?;
            Some(SocketAddr::new(ip, b.get_u16()))
        } else {
            None
        };
        let circuit = if flags & FLAG_CIRCUIT != 0 {
            Some(get_name(b, "circuit")?)
        } else {
            None
        };
        Ok(Header {
            kind: Kind::Data,
            service,
            hops,
            client,
            circuit,
        })
    }

    /// Checks the limits that `decode` enforces, so that `encode` never writes a header the peer
    /// would refuse.
    pub fn validate(&self) -> Result<(), HeaderError> {
        let name_ok =
            |s: &str| !s.is_empty() && s.len() <= MAX_NAME_LEN && !s.chars().any(char::is_control);
        if !name_ok(self.service.as_str()) {
            return Err(HeaderError::Field {
                field: "service",
                reason: "length out of range",
            });
        }
        if self.hops.len() > MAX_HOPS {
            return Err(HeaderError::TooManyHops(self.hops.len()));
        }
        if !self.hops.iter().all(|h| name_ok(h.as_str())) {
            return Err(HeaderError::Field {
                field: "hop",
                reason: "length out of range",
            });
        }
        if self.circuit.as_deref().is_some_and(|c| !name_ok(c)) {
            return Err(HeaderError::Field {
                field: "circuit",
                reason: "length out of range",
            });
        }
        Ok(())
    }

    /// Appends the encoded header to `out` (callers reuse one `BytesMut`). The worst case
    /// (16 hops of 63 bytes and all options) fits in [`MAX_HEADER_LEN`].
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), HeaderError> {
        self.validate()?;
        let start = out.len();
        out.put_u8(VERSION);
        out.put_u8(self.kind as u8);
        out.put_u16(0); // patched below
        let mut flags = 0;
        if self.client.is_some() {
            flags |= FLAG_CLIENT;
        }
        if self.circuit.is_some() {
            flags |= FLAG_CIRCUIT;
        }
        out.put_u8(flags);
        put_name(out, self.service.as_str());
        out.put_u8(self.hops.len() as u8);
        for h in &self.hops {
            put_name(out, h.as_str());
        }
        if let Some(c) = self.client {
            match c.ip() {
                IpAddr::V4(ip) => {
                    out.put_u8(4);
                    out.put_u32(ip.into());
                }
                IpAddr::V6(ip) => {
                    out.put_u8(6);
                    out.put_u128(ip.into());
                }
            }
            out.put_u16(c.port());
        }
        if let Some(c) = &self.circuit {
            put_name(out, c);
        }
        let total = out.len() - start;
        if total > MAX_HEADER_LEN {
            out.truncate(start);
            return Err(HeaderError::TooLarge(total));
        }
        let body = (total - PREFIX_LEN) as u16;
        out[start + 2..start + 4].copy_from_slice(&body.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            kind: Kind::Data,
            service: "llm-chat".into(),
            hops: vec!["sin-transit-1".into(), "sin-site-1".into()],
            client: Some("10.1.2.3:40000".parse().unwrap()),
            circuit: Some("circ-7".into()),
        }
    }

    #[test]
    fn roundtrip_sample() {
        let mut b = BytesMut::new();
        sample().encode(&mut b).unwrap();
        let mut r = b.freeze();
        assert_eq!(Header::decode(&mut r).unwrap(), sample());
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn worst_case_fits() {
        let n = "n".repeat(MAX_NAME_LEN);
        let h = Header {
            kind: Kind::Data,
            service: ServiceName::new(&n),
            hops: vec![NodeId::new(&n); MAX_HOPS],
            client: Some("[::1]:1".parse().unwrap()),
            circuit: Some(n.clone()),
        };
        let mut b = BytesMut::new();
        h.encode(&mut b).unwrap();
        assert!(b.len() <= MAX_HEADER_LEN);
        assert_eq!(Header::decode(&mut b.freeze()).unwrap(), h);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut b = BytesMut::new();
        sample().encode(&mut b).unwrap();
        for i in 0..b.len() {
            let mut s = &b[..i];
            assert!(
                Header::decode(&mut s).is_err(),
                "prefix of {i} bytes decoded"
            );
        }
    }

    #[test]
    fn oversize_and_bad_fields_are_refused() {
        assert_eq!(
            Header::body_len([1, 1, 0xff, 0xff]),
            Err(HeaderError::TooLarge(0xffff + 4))
        );
        assert_eq!(Header::body_len([2, 1, 0, 1]), Err(HeaderError::Version(2)));
        assert_eq!(Header::body_len([1, 9, 0, 1]), Err(HeaderError::Kind(9)));
        let mut trailing = BytesMut::new();
        sample().encode(&mut trailing).unwrap();
        trailing.put_u8(0);
        let len = (trailing.len() - PREFIX_LEN) as u16;
        trailing[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            Header::decode(&mut trailing.freeze()),
            Err(HeaderError::Trailing(1))
        );
        let too_many = Header {
            hops: vec!["a".into(); MAX_HOPS + 1],
            ..sample()
        };
        assert!(too_many.encode(&mut BytesMut::new()).is_err());
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9-]{1,63}"
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = Header::decode(&mut &bytes[..]);
        }

        #[test]
        fn random_bodies_behind_a_valid_prefix_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1020)) {
            let mut b = vec![VERSION, 1];
            b.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            b.extend_from_slice(&bytes);
            let _ = Header::decode(&mut &b[..]);
        }

        #[test]
        fn encode_decode_roundtrip(
            service in name(),
            hops in proptest::collection::vec(name(), 0..=MAX_HOPS),
            client in proptest::option::of((any::<IpAddr>(), any::<u16>())),
            circuit in proptest::option::of(name()),
        ) {
            let h = Header {
                kind: Kind::Data,
                service: ServiceName::new(service),
                hops: hops.into_iter().map(NodeId::new).collect(),
                client: client.map(|(ip, port)| SocketAddr::new(ip, port)),
                circuit,
            };
            let mut b = BytesMut::new();
            h.encode(&mut b).unwrap();
            prop_assert!(b.len() <= MAX_HEADER_LEN);
            prop_assert_eq!(Header::decode(&mut b.freeze()).unwrap(), h);
        }
    }
}
