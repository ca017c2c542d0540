//! The `JoinResponse.peer_table` blob (an encoded `PeerTable`, see
//! `proto/rendezvous.proto`): encoded once per generation by the launcher, decoded by
//! workers either fully (`decode_peer_table`, owned peers) or lazily without allocating
//! (`PeerTableReader`, borrowed peers: what a client that needs only a few entries uses).

use prost::Message;
use prost::bytes::Bytes;
use prost::encoding::{WireType, decode_key, decode_varint};

use crate::v1::{Peer, PeerTable};

/// Encodes the rank-ordered peers of one generation (done once per generation).
pub fn encode_peer_table(peers: Vec<Peer>) -> Bytes {
    Bytes::from(PeerTable { peers }.encode_to_vec())
}

/// Decodes a peer table blob into owned, rank-ordered peers.
pub fn decode_peer_table(blob: &[u8]) -> Result<Vec<Peer>, prost::DecodeError> {
    Ok(PeerTable::decode(blob)?.peers)
}

/// One peer borrowed from a peer table blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerRef<'a> {
    pub rank: u32,
    pub host: &'a str,
    pub comm_addr: &'a str,
    pub node_rank: u32,
    pub local_rank: u32,
}

/// Why a peer table blob could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTableError(String);

impl std::fmt::Display for PeerTableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed peer table: {}", self.0)
    }
}

impl std::error::Error for PeerTableError {}

impl From<prost::DecodeError> for PeerTableError {
    fn from(err: prost::DecodeError) -> Self {
        PeerTableError(err.to_string())
    }
}

/// Walks a peer table blob peer by peer, borrowing strings from it (no allocation).
#[derive(Debug, Clone)]
pub struct PeerTableReader<'a> {
    rest: &'a [u8],
}

impl<'a> PeerTableReader<'a> {
    pub fn new(blob: &'a [u8]) -> Self {
        PeerTableReader { rest: blob }
    }
}

impl<'a> Iterator for PeerTableReader<'a> {
    type Item = Result<PeerRef<'a>, PeerTableError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.rest.is_empty() {
            match next_field(&mut self.rest) {
                Ok((1, Field::Bytes(peer))) => return Some(read_peer(peer)),
                Ok(_) => continue, // a field this reader does not know
                Err(err) => {
                    self.rest = &[];
                    return Some(Err(err));
                }
            }
        }
        None
    }
}

/// A field's payload: varints as numbers, length-delimited fields as borrowed bytes.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Skipped,
}

fn next_field<'a>(buf: &mut &'a [u8]) -> Result<(u32, Field<'a>), PeerTableError> {
    let (tag, wire_type) = decode_key(buf)?;
    let field = match wire_type {
        WireType::Varint => Field::Varint(decode_varint(buf)?),
        WireType::LengthDelimited => {
            let len = decode_varint(buf)?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&len| len <= buf.len())
                .ok_or_else(|| PeerTableError(format!("field {tag} runs past the end")))?;
            let (payload, rest) = buf.split_at(len);
            *buf = rest;
            Field::Bytes(payload)
        }
        WireType::ThirtyTwoBit | WireType::SixtyFourBit => {
            let len = if wire_type == WireType::ThirtyTwoBit {
                4
            } else {
                8
            };
            *buf = buf
                .get(len..)
                .ok_or_else(|| PeerTableError(format!("field {tag} runs past the end")))?;
            Field::Skipped
        }
        WireType::StartGroup | WireType::EndGroup => {
            return Err(PeerTableError(format!("unexpected group in field {tag}")));
        }
    };
    Ok((tag, field))
}

fn read_peer(mut buf: &[u8]) -> Result<PeerRef<'_>, PeerTableError> {
    let mut peer = PeerRef::default();
    while !buf.is_empty() {
        match next_field(&mut buf)? {
            (1, Field::Varint(v)) => peer.rank = v as u32,
            (2, Field::Bytes(b)) => peer.host = text(b, "host")?,
            (3, Field::Bytes(b)) => peer.comm_addr = text(b, "comm_addr")?,
            (4, Field::Varint(v)) => peer.node_rank = v as u32,
            (5, Field::Varint(v)) => peer.local_rank = v as u32,
            (tag @ 1..=5, _) => {
                return Err(PeerTableError(format!(
                    "peer field {tag} has the wrong wire type"
                )));
            }
            _ => {}
        }
    }
    Ok(peer)
}

fn text<'a>(bytes: &'a [u8], field: &str) -> Result<&'a str, PeerTableError> {
    std::str::from_utf8(bytes).map_err(|_| PeerTableError(format!("peer {field} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: u32) -> Vec<Peer> {
        (0..n)
            .map(|rank| Peer {
                rank,
                host: format!("h{}", rank / 2),
                comm_addr: format!("10.0.0.{rank}:7000"),
                node_rank: rank / 2,
                local_rank: rank % 2,
            })
            .collect()
    }

    #[test]
    fn peer_table_round_trips_in_rank_order() {
        let blob = encode_peer_table(peers(3));
        assert_eq!(decode_peer_table(&blob).unwrap(), peers(3));
        assert!(decode_peer_table(&[0x0a, 0xff]).is_err());
    }

    #[test]
    fn the_lazy_reader_sees_what_the_full_decoder_sees() {
        let blob = encode_peer_table(peers(5));
        let lazy: Vec<PeerRef> = PeerTableReader::new(&blob)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(lazy.len(), 5);
        for (seen, want) in lazy.iter().zip(peers(5)) {
            assert_eq!(
                (
                    seen.rank,
                    seen.host,
                    seen.comm_addr,
                    seen.node_rank,
                    seen.local_rank
                ),
                (
                    want.rank,
                    &*want.host,
                    &*want.comm_addr,
                    want.node_rank,
                    want.local_rank
                )
            );
        }
        // Rank 0 has default numbers: proto3 leaves them off the wire.
        assert_eq!(lazy[0].comm_addr, "10.0.0.0:7000");
        assert_eq!(PeerTableReader::new(&[]).count(), 0);
    }

    #[test]
    fn the_lazy_reader_refuses_truncated_and_mistyped_tables() {
        let blob = encode_peer_table(peers(2));
        let truncated = &blob[..blob.len() - 3];
        let results: Vec<_> = PeerTableReader::new(truncated).collect();
        assert!(results.last().unwrap().is_err(), "{results:?}");
        // Field 2 (host) sent as a varint.
        let mistyped = [0x0a, 0x02, 0x10, 0x01];
        let err = PeerTableReader::new(&mistyped).next().unwrap().unwrap_err();
        assert!(err.to_string().contains("peer field 2"), "{err}");
        let not_utf8 = [0x0a, 0x03, 0x12, 0x01, 0xff];
        assert!(PeerTableReader::new(&not_utf8).next().unwrap().is_err());
    }
}
