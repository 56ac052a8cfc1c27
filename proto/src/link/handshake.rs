//! Link authentication: a shared-key HMAC challenge over two fresh nonces, both ways.
//! Sans-io: the two state machines take frames and return frames; the callers move bytes.
//!
//! ```text
//! edge   -> broker : Hello (as before) + Challenge{ne}
//! broker -> edge   : Challenge{nb} + Proof{mb}   mb = HMAC(K, "barrage-link-v1 broker" | ne | nb | hello)
//! edge   -> broker : Proof{me}                   me = HMAC(K, "barrage-link-v1 edge"   | ne | nb | hello)
//! broker -> edge   : Hello (as before), the link is up
//! ```
//! `hello` is the edge's whole encoded Hello frame (length field included), so the node id,
//! the shard and the priority it asked for are bound to the proof; `ne` and `nb` are 32 random
//! bytes each, so a recorded exchange cannot be replayed; the two labels differ, so a proof one
//! side computes is never a proof the other side could reuse. `K` is the key of the node id the
//! Hello names (the broker's `link_keys` table; `*` is a fleet-wide key), so one edge's key
//! cannot speak for another node id.
//!
//! Why this and not mutual TLS: the workspace has no TLS stack on the link today, keys are
//! already HMAC keys (tokens) handled with `ring`, and a shared key per node is one config line
//! on each side where mutual TLS needs a CA, certificates and their rotation. What it does not
//! give: confidentiality or integrity of the frames after the handshake. Run links on a private
//! network, or put them in TLS when `net::tls` is in.
//!
//! # Invariants
//! - The broker proves first, but only over the edge's nonce and its own fresh one, under the
//!   broker label: nothing it sends helps a peer without the key forge the edge label.
//! - The edge sends its proof only after it verified the broker's: an impostor broker learns
//!   nothing but the edge's Hello.
//! - MACs are compared with `ring::hmac::verify` (constant time).
//! - Secrets never reach `Debug`: [`LinkKey`] prints nothing of itself.

use super::LinkFrame;
use ring::hmac;

/// Bytes of a nonce in `Challenge`.
pub const NONCE_BYTES: usize = 32;
/// Bytes of an HMAC-SHA256 in `Proof`.
pub const MAC_BYTES: usize = 32;
/// Label of the broker's proof.
pub const BROKER_LABEL: &[u8] = b"barrage-link-v1 broker";
/// Label of the edge's proof.
pub const EDGE_LABEL: &[u8] = b"barrage-link-v1 edge";

/// A link key (HMAC-SHA256). Check its strength with [`crate::token::check_secret`] first.
#[derive(Clone)]
pub struct LinkKey(hmac::Key);

impl LinkKey {
    pub fn new(secret: &[u8]) -> LinkKey {
        LinkKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// The bytes a proof covers: `label | ne | nb | hello`.
    fn input(
        label: &[u8],
        ne: &[u8; NONCE_BYTES],
        nb: &[u8; NONCE_BYTES],
        hello: &[u8],
    ) -> Vec<u8> {
        let mut msg = Vec::with_capacity(label.len() + 2 * NONCE_BYTES + hello.len());
        msg.extend_from_slice(label);
        msg.extend_from_slice(ne);
        msg.extend_from_slice(nb);
        msg.extend_from_slice(hello);
        msg
    }

    fn verify(
        &self,
        label: &[u8],
        ne: &[u8; NONCE_BYTES],
        nb: &[u8; NONCE_BYTES],
        hello: &[u8],
        mac: &[u8; MAC_BYTES],
    ) -> bool {
        hmac::verify(&self.0, &Self::input(label, ne, nb, hello), mac).is_ok()
    }

    /// The proof `label` over these inputs (for docs and tests).
    pub fn proof(
        &self,
        label: &[u8],
        ne: &[u8; NONCE_BYTES],
        nb: &[u8; NONCE_BYTES],
        hello: &[u8],
    ) -> [u8; MAC_BYTES] {
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(hmac::sign(&self.0, &Self::input(label, ne, nb, hello)).as_ref());
        out
    }
}

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

/// Why a link handshake failed. Either way the connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer sent a frame the handshake did not expect at this step.
    #[error("unexpected frame during the link handshake")]
    Unexpected,
    /// The peer's proof does not verify: it does not hold the key (or the bytes were altered).
    #[error("link proof does not verify")]
    BadProof,
    /// The Hello names a node id the broker holds no key for.
    #[error("no link key for this node id")]
    UnknownNode,
    /// The peer did not authenticate where this side requires it.
    #[error("peer did not authenticate")]
    Unauthenticated,
}

/// What the edge does next.
#[derive(Debug, PartialEq, Eq)]
pub enum EdgeStep {
    /// Keep reading frames.
    More,
    /// Send these frames; the broker is authenticated and the next frame is its Hello.
    Done(Vec<LinkFrame>),
}

#[derive(Debug)]
enum EdgeState {
    AwaitChallenge,
    AwaitProof { nb: [u8; NONCE_BYTES] },
    Done,
}

/// The edge side of one handshake.
#[derive(Debug)]
pub struct EdgeHandshake {
    key: LinkKey,
    hello: Vec<u8>,
    ne: [u8; NONCE_BYTES],
    state: EdgeState,
}

impl EdgeHandshake {
    /// Starts after the edge encoded its Hello frame (`hello`, exactly the bytes it sends);
    /// returns the handshake and the `Challenge` to send right after the Hello.
    pub fn start(
        key: LinkKey,
        hello: &[u8],
        nonce: [u8; NONCE_BYTES],
    ) -> (EdgeHandshake, LinkFrame) {
        (
            EdgeHandshake {
                key,
                hello: hello.to_vec(),
                ne: nonce,
                state: EdgeState::AwaitChallenge,
            },
            LinkFrame::Challenge { nonce },
        )
    }

    /// True once the broker's proof verified and ours was handed out.
    pub fn is_done(&self) -> bool {
        matches!(self.state, EdgeState::Done)
    }

    /// Feeds one frame from the broker.
    pub fn on_frame(&mut self, frame: &LinkFrame) -> Result<EdgeStep, HandshakeError> {
        match (&self.state, frame) {
            (EdgeState::AwaitChallenge, LinkFrame::Challenge { nonce }) => {
                self.state = EdgeState::AwaitProof { nb: *nonce };
                Ok(EdgeStep::More)
            }
            (EdgeState::AwaitProof { nb }, LinkFrame::Proof { mac }) => {
                let nb = *nb;
                if !self
                    .key
                    .verify(BROKER_LABEL, &self.ne, &nb, &self.hello, mac)
                {
                    return Err(HandshakeError::BadProof);
                }
                self.state = EdgeState::Done;
                let mac = self.key.proof(EDGE_LABEL, &self.ne, &nb, &self.hello);
                Ok(EdgeStep::Done(vec![LinkFrame::Proof { mac }]))
            }
            // A broker that answers Hello without proving itself is not accepted.
            (EdgeState::AwaitChallenge | EdgeState::AwaitProof { .. }, LinkFrame::Hello(_)) => {
                Err(HandshakeError::Unauthenticated)
            }
            _ => Err(HandshakeError::Unexpected),
        }
    }
}

/// The broker side of one handshake, created once it read the edge's Hello and Challenge.
#[derive(Debug)]
pub struct BrokerHandshake {
    key: LinkKey,
    hello: Vec<u8>,
    ne: [u8; NONCE_BYTES],
    nb: [u8; NONCE_BYTES],
}

impl BrokerHandshake {
    /// `hello` is the edge's Hello frame as received, `challenge` the frame after it, `nonce`
    /// fresh random bytes. Returns the handshake and the frames to send (Challenge, Proof).
    pub fn start(
        key: LinkKey,
        hello: &[u8],
        challenge: &LinkFrame,
        nonce: [u8; NONCE_BYTES],
    ) -> Result<(BrokerHandshake, [LinkFrame; 2]), HandshakeError> {
        let LinkFrame::Challenge { nonce: ne } = challenge else {
            return Err(HandshakeError::Unauthenticated);
        };
        let hs = BrokerHandshake {
            key,
            hello: hello.to_vec(),
            ne: *ne,
            nb: nonce,
        };
        let mac = hs.key.proof(BROKER_LABEL, &hs.ne, &hs.nb, &hs.hello);
        Ok((
            hs,
            [LinkFrame::Challenge { nonce }, LinkFrame::Proof { mac }],
        ))
    }

    /// Checks the edge's proof: Ok means the peer holds the key of the node id it named.
    pub fn finish(&self, proof: &LinkFrame) -> Result<(), HandshakeError> {
        let LinkFrame::Proof { mac } = proof else {
            return Err(HandshakeError::Unexpected);
        };
        if self
            .key
            .verify(EDGE_LABEL, &self.ne, &self.nb, &self.hello, mac)
        {
            Ok(())
        } else {
            Err(HandshakeError::BadProof)
        }
    }
}

/// The broker's link keys by node id: `"node_id:secret"` entries, `"*:secret"` for any node.
#[derive(Clone, Debug, Default)]
pub struct KeyTable {
    by_node: Vec<(String, LinkKey)>,
    any: Option<LinkKey>,
}

impl KeyTable {
    /// Parses entries (the secret is everything after the first `:`). Strength is the caller's
    /// to judge (see [`KeyTable::secrets`] and [`crate::token::check_secret`]).
    pub fn parse(entries: &[String]) -> Result<KeyTable, String> {
        let mut t = KeyTable::default();
        for e in entries {
            let Some((node, secret)) = e.split_once(':') else {
                return Err("link_keys entries are \"node_id:secret\" (or \"*:secret\")".into());
            };
            if node.is_empty() {
                return Err("link_keys: empty node id".into());
            }
            if secret.is_empty() {
                return Err(format!("link_keys entry for {node:?}: empty secret"));
            }
            let key = LinkKey::new(secret.as_bytes());
            if node == "*" {
                t.any = Some(key);
            } else {
                t.by_node.push((node.to_string(), key));
            }
        }
        Ok(t)
    }

    /// No keys: links are not authenticated (allowed from loopback peers only).
    pub fn is_empty(&self) -> bool {
        self.by_node.is_empty() && self.any.is_none()
    }

    /// The key for `node_id`: its own entry, else the fleet-wide one.
    pub fn key_for(&self, node_id: &str) -> Option<&LinkKey> {
        self.by_node
            .iter()
            .find(|(n, _)| n == node_id)
            .map(|(_, k)| k)
            .or(self.any.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Priority;
    use crate::link::{encode, Hello};

    const SECRET: &[u8] = b"link-secret-for-tests-0123456789abcdef";

    fn hello_bytes(node: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode(
            &LinkFrame::Hello(Hello {
                node_id: node.into(),
                region: "local".into(),
                shards: 2,
                link_shard: 0,
                priority: Priority::Low,
                capabilities: 3,
            }),
            &mut out,
        );
        out
    }

    fn run(edge_key: &[u8], broker_key: &[u8]) -> Result<(), HandshakeError> {
        let hello = hello_bytes("edge-1");
        let (mut e, challenge) = EdgeHandshake::start(LinkKey::new(edge_key), &hello, [1; 32]);
        let (b, reply) =
            BrokerHandshake::start(LinkKey::new(broker_key), &hello, &challenge, [2; 32])?;
        assert_eq!(e.on_frame(&reply[0])?, EdgeStep::More);
        let EdgeStep::Done(out) = e.on_frame(&reply[1])? else {
            panic!("edge not done");
        };
        assert!(e.is_done());
        b.finish(&out[0])
    }

    #[test]
    fn same_key_authenticates_both_ways() {
        assert_eq!(run(SECRET, SECRET), Ok(()));
    }

    #[test]
    fn a_wrong_key_fails_on_whichever_side_checks_first() {
        // The edge checks the broker's proof first: an impostor broker is caught there.
        assert_eq!(
            run(SECRET, b"another-secret-0123456789abcdef0123"),
            Err(HandshakeError::BadProof)
        );
    }

    #[test]
    fn edge_without_key_cannot_forge_a_proof() {
        let hello = hello_bytes("edge-1");
        let (_, challenge) = EdgeHandshake::start(LinkKey::new(b"x"), &hello, [1; 32]);
        let (b, reply) =
            BrokerHandshake::start(LinkKey::new(SECRET), &hello, &challenge, [2; 32]).unwrap();
        // Replaying the broker's own proof as the edge's does not verify (labels differ).
        assert_eq!(b.finish(&reply[1]), Err(HandshakeError::BadProof));
        assert_eq!(
            b.finish(&LinkFrame::Proof { mac: [0; 32] }),
            Err(HandshakeError::BadProof)
        );
        assert_eq!(
            b.finish(&LinkFrame::Ping { nonce: 1 }),
            Err(HandshakeError::Unexpected)
        );
    }

    #[test]
    fn the_proof_binds_the_hello() {
        let hello = hello_bytes("edge-1");
        let (mut e, challenge) = EdgeHandshake::start(LinkKey::new(SECRET), &hello, [1; 32]);
        // The broker saw another node id (e.g. the Hello was altered): nothing verifies.
        let (b, reply) = BrokerHandshake::start(
            LinkKey::new(SECRET),
            &hello_bytes("edge-2"),
            &challenge,
            [2; 32],
        )
        .unwrap();
        e.on_frame(&reply[0]).unwrap();
        assert_eq!(e.on_frame(&reply[1]), Err(HandshakeError::BadProof));
        let forged = LinkKey::new(SECRET).proof(EDGE_LABEL, &[1; 32], &[2; 32], &hello);
        assert_eq!(
            b.finish(&LinkFrame::Proof { mac: forged }),
            Err(HandshakeError::BadProof)
        );
    }

    #[test]
    fn edge_refuses_a_broker_that_skips_the_proof() {
        let hello = hello_bytes("edge-1");
        let (mut e, _) = EdgeHandshake::start(LinkKey::new(SECRET), &hello, [1; 32]);
        let h = crate::link::decode(&bytes::Bytes::from(hello.clone()), 1 << 20)
            .unwrap()
            .0;
        assert_eq!(e.on_frame(&h), Err(HandshakeError::Unauthenticated));
    }

    /// The worked example in docs/protocol-link-ingest.md.
    #[test]
    fn doc_vector() {
        let key = LinkKey::new(b"0123456789abcdef0123456789abcdef");
        let mut hello = Vec::new();
        encode(
            &LinkFrame::Hello(Hello {
                node_id: "e1".into(),
                region: "sh".into(),
                shards: 4,
                link_shard: 0,
                priority: Priority::Low,
                capabilities: 0xf,
            }),
            &mut hello,
        );
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mb = key.proof(BROKER_LABEL, &[0x11; 32], &[0x22; 32], &hello);
        let me = key.proof(EDGE_LABEL, &[0x11; 32], &[0x22; 32], &hello);
        println!("mb {}\nme {}", hex(&mb), hex(&me));
        assert_eq!(hex(&mb), DOC_MB);
        assert_eq!(hex(&me), DOC_ME);
    }

    const DOC_MB: &str = "26afcf7f909536fe72312b79ef763303c86b09fae74191576e069b32cf3ada46";
    const DOC_ME: &str = "1bbdee150a9aaefda35c618db0f9475ce95a4428fcff1ddb5a258194320862f4";

    #[test]
    fn key_table_binds_node_ids() {
        let good = "0123456789abcdef0123456789abcdef";
        let t = KeyTable::parse(&[format!("edge-1:{good}")]).unwrap();
        assert!(t.key_for("edge-1").is_some());
        assert!(t.key_for("edge-2").is_none());
        let t = KeyTable::parse(&[format!("*:{good}")]).unwrap();
        assert!(t.key_for("anyone").is_some());
        assert!(KeyTable::parse(&["edge-1:".into()]).is_err());
        assert!(KeyTable::parse(&["nocolon".into()]).is_err());
        assert!(KeyTable::parse(&[]).unwrap().is_empty());
    }
}
