//! Exit codes scripts can act on, and error messages that say each cause once.

/// What `barrage` exits with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: done.
    Ok = 0,
    /// 1: anything else (a bug, the host, a failed check: `doctor` found a capacity cap).
    Failure = 1,
    /// 2: usage: bad flags, a config that does not load or check.
    Usage = 2,
    /// 3: refused by policy: bad API key, forbidden scope, refused token, message too large or
    /// invalid. Retrying the same request will not help.
    Refused = 3,
    /// 4: retryable: rate limited or overloaded. Retry later, with backoff.
    Retryable = 4,
    /// 5: unreachable: nothing answered at the address (down, wrong address, network).
    Unreachable = 5,
}

/// The exit-code table for `--help`.
pub const HELP: &str = "Exit codes: 0 ok, 1 failure, 2 usage or config, 3 refused by policy, \
                        4 retryable (rate limited, overloaded), 5 unreachable.";

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

/// The exit code for an error: the first cause in the chain that says.
pub fn classify(e: &anyhow::Error) -> Exit {
    use broker::ClientError;
    use loadtest::client::TicketError;
    use proto::ingest::PushError;
    for cause in e.chain() {
        if cause.downcast_ref::<net::config::ConfigError>().is_some() {
            return Exit::Usage;
        }
        if let Some(p) = cause.downcast_ref::<PushError>() {
            return match p {
                PushError::RateLimited { .. } | PushError::Overloaded => Exit::Retryable,
                _ => Exit::Refused,
            };
        }
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            match c {
                ClientError::Rejected(_) => continue,
                ClientError::Timeout => return Exit::Unreachable,
                ClientError::Io(io) => return io_exit(io),
                ClientError::Protocol(_) => return Exit::Failure,
            }
        }
        if let Some(t) = cause.downcast_ref::<TicketError>() {
            return match t {
                TicketError::Url(_) => Exit::Usage,
                TicketError::Http(_) | TicketError::NoEdge => Exit::Unreachable,
                TicketError::Status(401 | 403 | 400 | 404 | 413) => Exit::Refused,
                TicketError::Status(429 | 503) => Exit::Retryable,
                TicketError::Status(_) | TicketError::Body => Exit::Failure,
            };
        }
        if let Some(t) = cause.downcast_ref::<crate::tail::TailError>() {
            return match t {
                crate::tail::TailError::TokenRefused(_) => Exit::Refused,
                crate::tail::TailError::NoEdgeAnswered(_) => Exit::Unreachable,
            };
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            let code = io_exit(io);
            if code != Exit::Failure {
                return code;
            }
        }
    }
    Exit::Failure
}

fn io_exit(e: &std::io::Error) -> Exit {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut | HostUnreachable
        | NetworkUnreachable | AddrNotAvailable | NotConnected => Exit::Unreachable,
        _ => Exit::Failure,
    }
}

/// The error and its causes on one line, each said once: a cause whose text the message
/// before it already ends with (`refused: unauthorized` then `unauthorized`) is left out.
pub fn message(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() {
            continue;
        }
        if parts
            .last()
            .is_some_and(|prev| prev.ends_with(&text) || prev.contains(&format!(": {text}")))
        {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn each_cause_is_said_once() {
        let e = anyhow::Error::from(broker::ClientError::Rejected(
            proto::ingest::PushError::Unauthorized,
        ));
        assert_eq!(message(&e), "refused: unauthorized");
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = anyhow::Error::from(broker::ClientError::Io(io)).context("connecting to ingest");
        assert_eq!(message(&e), "connecting to ingest: io: connection refused");
        let e = anyhow::anyhow!("outer").context("top");
        assert_eq!(message(&e), "top: outer");
    }

    #[test]
    fn codes_follow_the_cause() {
        let refused = |p| {
            let e: anyhow::Error = broker::ClientError::Rejected(p).into();
            classify(&e.context("push refused"))
        };
        use proto::ingest::PushError;
        assert_eq!(refused(PushError::Unauthorized), Exit::Refused);
        assert_eq!(refused(PushError::ForbiddenScope), Exit::Refused);
        assert_eq!(refused(PushError::Overloaded), Exit::Retryable);
        assert_eq!(
            refused(PushError::RateLimited { retry_after_ms: 5 }),
            Exit::Retryable
        );
        let down: anyhow::Error =
            broker::ClientError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                .into();
        assert_eq!(classify(&down), Exit::Unreachable);
        let t: anyhow::Error = loadtest::client::TicketError::Status(429).into();
        assert_eq!(classify(&t), Exit::Retryable);
        let t: anyhow::Error = loadtest::client::TicketError::Status(401).into();
        assert_eq!(classify(&t), Exit::Refused);
        let c: anyhow::Error = net::config::ConfigError::Invalid("x".into()).into();
        assert_eq!(classify(&c), Exit::Usage);
        assert_eq!(classify(&anyhow::anyhow!("anything else")), Exit::Failure);
        let r: Result<(), std::io::Error> = Err(std::io::ErrorKind::PermissionDenied.into());
        assert_eq!(classify(&r.context("x").unwrap_err()), Exit::Failure);
    }
}
