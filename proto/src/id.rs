//! Identifiers and shared enums. Parse, don't validate: a `RoomId` is never confused with a `UserId`.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident, $inner:ty) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_newtype!(
    /// A live room.
    RoomId, u64
);
id_newtype!(
    /// A logged-in user; `UserId(0)` is a guest.
    UserId, u64
);
id_newtype!(
    /// A category area of rooms (the "region-level" scope).
    AreaId, u32
);
id_newtype!(
    /// A message id assigned by the broker at acceptance; unique per broker, increasing.
    MsgId, u64
);

impl UserId {
    /// The guest user: bound to a device id and a room, never to an account.
    pub const GUEST: UserId = UserId(0);

    pub fn is_guest(self) -> bool {
        self.0 == 0
    }
}

/// A device id (`buvid` in the auth body). At most [`crate::limits::DEVICE_BYTES_MAX`] bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct DeviceId(pub String);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a push goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every viewer of one room.
    Room(RoomId),
    /// Every viewer of every room in an area.
    Area(AreaId),
    /// Every connection.
    Global,
    /// Every connection of one user.
    User(UserId),
    /// Every connection of one device.
    Device(DeviceId),
}

impl Scope {
    /// Wire tag for the scope kind (shared by link and ingest frames).
    pub fn tag(&self) -> u8 {
        match self {
            Scope::Room(_) => 0,
            Scope::Area(_) => 1,
            Scope::Global => 2,
            Scope::User(_) => 3,
            Scope::Device(_) => 4,
        }
    }
}

/// Priority class. High priority (e.g. PK invitations) travels on its own links and queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    #[default]
    Low = 0,
    High = 1,
}

impl Priority {
    pub fn from_u8(v: u8) -> Option<Priority> {
        match v {
            0 => Some(Priority::Low),
            1 => Some(Priority::High),
            _ => None,
        }
    }
}

/// Delivery guarantee asked for a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Reach {
    /// Best effort: losses are visible as room seq gaps.
    #[default]
    BestEffort = 0,
    /// High reach: `msg_id`, client ACK, resend within a window.
    High = 1,
}

impl Reach {
    pub fn from_u8(v: u8) -> Option<Reach> {
        match v {
            0 => Some(Reach::BestEffort),
            1 => Some(Reach::High),
            _ => None,
        }
    }
}

/// The body encoding of an outer client packet; the values are the packet `ver` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Encoding {
    /// `ver 0`: one or more plain packets back to back.
    Plain = 0,
    /// `ver 2`: zlib of a run of packets.
    Zlib = 2,
    /// `ver 3`: brotli of a run of packets.
    Brotli = 3,
}

impl Encoding {
    pub fn from_u8(v: u8) -> Option<Encoding> {
        match v {
            0 => Some(Encoding::Plain),
            2 => Some(Encoding::Zlib),
            3 => Some(Encoding::Brotli),
            _ => None,
        }
    }

    /// The encoding a client asks for with `protover` in its auth body.
    pub fn from_protover(protover: u32) -> Encoding {
        match protover {
            3 => Encoding::Brotli,
            2 => Encoding::Zlib,
            _ => Encoding::Plain,
        }
    }

    /// Bit of this encoding in an encoding set (link SUB frames carry such a set).
    pub fn bit(self) -> u8 {
        match self {
            Encoding::Plain => 1,
            Encoding::Zlib => 2,
            Encoding::Brotli => 4,
        }
    }
}
