//! Whether a request that failed on one backend goes again, and where: a pure decision
//! over what happened to the attempt, tested alone (as linkerd2-proxy's retry policy).
//!
//! A request that never left surge may always be sent again. One that reached a backend
//! may go to another only if repeating it is harmless (an idempotent method, RFC 9110
//! §9.2.2) and the failure says the backend cannot have answered (the connection closed
//! or reset before a response). A backend is blamed (its failure counted for passive
//! ejection, and the retry sent elsewhere) unless the fault was a pooled connection it had
//! closed while idle, which is ordinary keep-alive life.

/// What happened to one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// No connection to the backend could be opened: nothing was sent.
    ConnectFailed,
    /// Not a byte of the request left surge (a write that failed after some did is a
    /// `Failed`); `reused`: it was a pooled connection.
    Unsent { reused: bool },
    /// It failed after being sent; `closed_early`: the connection closed or reset before
    /// any response (the backend may not have processed it).
    Failed { closed_early: bool },
    /// No response head within the response timeout.
    TimedOut,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send the very same request again (it never left surge).
    Resend,
    /// Send the idempotent copy of the request to another backend.
    SendCopy,
    /// Answer the shopper with the failure.
    GiveUp,
}

/// The decision after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub next: Next,
    /// Count a failure against the backend and keep the next attempt away from it.
    pub blame: bool,
}

/// The decision after `attempt`, for a request whose method is `idempotent` (and so has
/// a copy kept to send again).
pub fn after(attempt: Attempt, idempotent: bool) -> Verdict {
    let (next, blame) = match attempt {
        Attempt::ConnectFailed => (Next::Resend, true),
        Attempt::Unsent { reused } => (Next::Resend, !reused),
        Attempt::Failed { closed_early } if idempotent && closed_early => (Next::SendCopy, true),
        Attempt::Failed { .. } | Attempt::TimedOut => (Next::GiveUp, true),
    };
    Verdict { next, blame }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attempt_outcome() {
        let cases = [
            // (attempt, idempotent, next, blame)
            (Attempt::ConnectFailed, false, Next::Resend, true),
            (Attempt::ConnectFailed, true, Next::Resend, true),
            (Attempt::Unsent { reused: true }, false, Next::Resend, false),
            (Attempt::Unsent { reused: false }, false, Next::Resend, true),
            (
                Attempt::Failed { closed_early: true },
                true,
                Next::SendCopy,
                true,
            ),
            // A POST that reached a backend is never sent twice.
            (
                Attempt::Failed { closed_early: true },
                false,
                Next::GiveUp,
                true,
            ),
            // Garbage or a half-sent answer: the backend did process it.
            (
                Attempt::Failed {
                    closed_early: false,
                },
                true,
                Next::GiveUp,
                true,
            ),
            // A slow backend may still be working on it: no second copy.
            (Attempt::TimedOut, true, Next::GiveUp, true),
        ];
        for (attempt, idempotent, next, blame) in cases {
            assert_eq!(
                after(attempt, idempotent),
                Verdict { next, blame },
                "{attempt:?}, idempotent {idempotent}"
            );
        }
    }
}
