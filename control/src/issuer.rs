//! Token issuing: claims for a client, signed with the newest key of the key set.
//!
//! Invariant: an issuer never holds an empty key set (`Issuer::new` refuses one), so every
//! issued token verifies at an edge that holds the same keys until `expires_at_s`.

use crate::room::RoomInfo;
use proto::id::{AreaId, DeviceId, RoomId, UserId};
use proto::token::{Claims, KeySet};

/// Signs client tokens.
#[derive(Clone)]
pub struct Issuer {
    keys: KeySet,
    token_ttl_s: u64,
}

/// A token and when it stops working (unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub token: String,
    pub expires_at_s: u64,
}

impl Issuer {
    /// `None` when `keys` is empty.
    pub fn new(keys: KeySet, token_ttl_s: u64) -> Option<Issuer> {
        if keys.is_empty() {
            return None;
        }
        Some(Issuer { keys, token_ttl_s })
    }

    /// A token for `uid` (0: guest) on `device` in `room`, valid from `now_s` for `token_ttl_s`.
    pub fn issue(&self, uid: u64, device: &str, room: &RoomInfo, now_s: u64) -> Issued {
        let expires_at_s = now_s.saturating_add(self.token_ttl_s);
        let claims = Claims {
            uid: UserId(uid),
            device: DeviceId(device.to_string()),
            room: RoomId(room.room_id),
            area: AreaId(room.area),
            expires_at_s,
        };
        Issued {
            token: self.keys.sign(&claims),
            expires_at_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_with_the_claims_asked_for() {
        let keys = KeySet::parse("1:0123456789abcdef0123,2:fedcba9876543210fedc").unwrap();
        let issuer = Issuer::new(keys.clone(), 60).unwrap();
        let room = RoomInfo {
            room_id: 42,
            short_id: 0,
            uid: 0,
            area: 7,
        };
        let got = issuer.issue(99, "dev-1", &room, 1_000_000);
        assert_eq!(got.expires_at_s, 1_000_060);
        let v = keys.verify(&got.token, 1_000_000).unwrap();
        assert_eq!(v.key_id, 2, "signed with the newest key");
        assert_eq!(v.claims.uid, UserId(99));
        assert_eq!(v.claims.device, DeviceId("dev-1".into()));
        assert_eq!(v.claims.room, RoomId(42));
        assert_eq!(v.claims.area, AreaId(7));
        assert!(
            keys.verify(&got.token, 1_000_061).is_err(),
            "expired after the ttl"
        );
        assert!(Issuer::new(KeySet::default(), 60).is_none());
    }
}
