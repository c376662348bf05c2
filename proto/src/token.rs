//! Session tokens: minted and signed (ed25519) by the indexer, verified offline by relays
//! and render nodes with the indexer's public key.
//!
//! A token is `base64url(payload ‖ signature)`, the signature covering the payload:
//!
//! | field       | size        | meaning                                         |
//! |-------------|-------------|-------------------------------------------------|
//! | version     | 1           | [`TOKEN_VERSION`]                               |
//! | session     | 16          | session id                                      |
//! | role        | 1           | 0 player, 1 spectator                           |
//! | issued_at   | 8           | Unix seconds                                    |
//! | expires_at  | 8           | Unix seconds                                    |
//! | title       | 1 + n ≤ 64  | length-prefixed UTF-8                           |
//! | node        | 1 + n ≤ 64  | render node id                                  |
//! | relay       | 1 + n ≤ 64  | relay id                                        |
//! | signature   | 64          | ed25519 over everything above                   |
//!
//! Verification takes the current time explicitly, as every I/O-free part of Pylon does.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use thiserror::Error;

/// Version of the token format.
pub const TOKEN_VERSION: u8 = 1;
/// Longest id or title a token carries.
pub const MAX_FIELD: usize = 64;
/// Longest token text accepted.
pub const MAX_TOKEN_TEXT: usize = 1024;

/// What the holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Plays: may send input.
    Player,
    /// Watches: input is refused.
    Spectator,
    /// An approved checker auditing the node: plays like a player (its input reaches the
    /// game) in a session the indexer opened for the check, on the node's free capacity.
    Checker,
}

/// The claims a token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Session id.
    pub session: [u8; 16],
    /// Role of the holder.
    pub role: Role,
    /// When it was minted (Unix seconds).
    pub issued_at: u64,
    /// When it stops being valid (Unix seconds).
    pub expires_at: u64,
    /// Title id.
    pub title: String,
    /// Render node id.
    pub node: String,
    /// Relay id.
    pub relay: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// Not base64url, too long, truncated or with bad fields.
    #[error("malformed session token")]
    Malformed,
    /// Another format version.
    #[error("session token version {0} is not supported")]
    Version(u8),
    /// The signature does not match the indexer's key: forged or altered.
    #[error("session token signature is invalid")]
    BadSignature,
    /// Past its expiry.
    #[error("session token expired at {expired_at} (now {now})")]
    Expired {
        /// Expiry, Unix seconds.
        expired_at: u64,
        /// The verifier's time.
        now: u64,
    },
    /// Minted for another relay or node.
    #[error("session token is for {field} {expected:?}, not {actual:?}")]
    WrongHolder {
        /// `relay` or `node`.
        field: &'static str,
        /// Who the token names.
        expected: String,
        /// Who is verifying.
        actual: String,
    },
    /// A field too long to encode.
    #[error("{0} is longer than {MAX_FIELD} bytes")]
    FieldTooLong(&'static str),
}

fn put_str(out: &mut Vec<u8>, s: &str, name: &'static str) -> Result<(), TokenError> {
    let len =
        u8::try_from(s.len()).ok().filter(|l| usize::from(*l) <= MAX_FIELD).ok_or(TokenError::FieldTooLong(name))?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

impl Claims {
    fn payload(&self) -> Result<Vec<u8>, TokenError> {
        let mut out = Vec::with_capacity(64 + self.title.len() + self.node.len() + self.relay.len());
        out.push(TOKEN_VERSION);
        out.extend_from_slice(&self.session);
        out.push(match self.role {
            Role::Player => 0,
            Role::Spectator => 1,
            Role::Checker => 2,
        });
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        put_str(&mut out, &self.title, "title")?;
        put_str(&mut out, &self.node, "node")?;
        put_str(&mut out, &self.relay, "relay")?;
        Ok(out)
    }

    /// Signs the claims into token text.
    pub fn sign(&self, key: &SigningKey) -> Result<String, TokenError> {
        let mut bytes = self.payload()?;
        let sig = key.sign(&bytes);
        bytes.extend_from_slice(&sig.to_bytes());
        Ok(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Session id as lowercase hex.
    pub fn session_hex(&self) -> String {
        self.session.iter().map(|b| format!("{b:02x}")).collect()
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], TokenError> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(TokenError::Malformed)?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, TokenError> {
        self.take(1)?.first().copied().ok_or(TokenError::Malformed)
    }
    fn u64(&mut self) -> Result<u64, TokenError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| TokenError::Malformed)?))
    }
    fn string(&mut self) -> Result<String, TokenError> {
        let len = usize::from(self.u8()?);
        if len > MAX_FIELD {
            return Err(TokenError::Malformed);
        }
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| TokenError::Malformed)
    }
}

/// Checks a token's signature and expiry against the indexer's key at time `now` (Unix
/// seconds) and returns its claims. The caller then checks the holder (see
/// [`Claims::check_relay`]) and whether the session has ended.
pub fn verify(text: &str, key: &VerifyingKey, now: u64) -> Result<Claims, TokenError> {
    let claims = verify_signature(text, key)?;
    if now >= claims.expires_at {
        return Err(TokenError::Expired { expired_at: claims.expires_at, now });
    }
    Ok(claims)
}

/// Checks only that the indexer signed the token (not its expiry): for the indexer, to
/// which an expired token still proves who holds a session that is running.
pub fn verify_signature(text: &str, key: &VerifyingKey) -> Result<Claims, TokenError> {
    if text.len() > MAX_TOKEN_TEXT {
        return Err(TokenError::Malformed);
    }
    let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| TokenError::Malformed)?;
    let split = bytes.len().checked_sub(64).ok_or(TokenError::Malformed)?;
    let (payload, sig) = bytes.split_at(split);
    let mut r = Reader(payload);
    let version = r.u8()?;
    if version != TOKEN_VERSION {
        return Err(TokenError::Version(version));
    }
    let sig = Signature::from_slice(sig).map_err(|_| TokenError::Malformed)?;
    key.verify(payload, &sig).map_err(|_| TokenError::BadSignature)?;
    let session: [u8; 16] = r.take(16)?.try_into().map_err(|_| TokenError::Malformed)?;
    let role = match r.u8()? {
        0 => Role::Player,
        1 => Role::Spectator,
        2 => Role::Checker,
        _ => return Err(TokenError::Malformed),
    };
    let issued_at = r.u64()?;
    let expires_at = r.u64()?;
    let claims =
        Claims { session, role, issued_at, expires_at, title: r.string()?, node: r.string()?, relay: r.string()? };
    if !r.0.is_empty() {
        return Err(TokenError::Malformed);
    }
    Ok(claims)
}

impl Claims {
    /// Refuses a token minted for another relay.
    pub fn check_relay(&self, relay: &str) -> Result<(), TokenError> {
        if self.relay == relay {
            Ok(())
        } else {
            Err(TokenError::WrongHolder { field: "relay", expected: self.relay.clone(), actual: relay.into() })
        }
    }

    /// Refuses a token minted for another render node.
    pub fn check_node(&self, node: &str) -> Result<(), TokenError> {
        if self.node == node {
            Ok(())
        } else {
            Err(TokenError::WrongHolder { field: "node", expected: self.node.clone(), actual: node.into() })
        }
    }

    /// Whether the holder may send input.
    pub fn may_send_input(&self) -> bool {
        matches!(self.role, Role::Player | Role::Checker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims(role: Role) -> Claims {
        Claims {
            session: [7; 16],
            role,
            issued_at: 1_000,
            expires_at: 1_300,
            title: "demo".into(),
            node: "node-a".into(),
            relay: "relay-eu-1".into(),
        }
    }

    #[test]
    fn round_trip_and_holder_checks() {
        let k = key(1);
        let text = claims(Role::Player).sign(&k).unwrap();
        let back = verify(&text, &k.verifying_key(), 1_100).unwrap();
        assert_eq!(back, claims(Role::Player));
        assert!(back.may_send_input());
        back.check_relay("relay-eu-1").unwrap();
        back.check_node("node-a").unwrap();
        assert!(matches!(back.check_relay("relay-us-2"), Err(TokenError::WrongHolder { field: "relay", .. })));
        assert!(matches!(back.check_node("node-b"), Err(TokenError::WrongHolder { field: "node", .. })));
        let spectator = verify(&claims(Role::Spectator).sign(&k).unwrap(), &k.verifying_key(), 1_100).unwrap();
        assert!(!spectator.may_send_input(), "a spectator token can never send input");
        let checker = verify(&claims(Role::Checker).sign(&k).unwrap(), &k.verifying_key(), 1_100).unwrap();
        assert_eq!(checker.role, Role::Checker);
        assert!(checker.may_send_input(), "a checker plays the session opened for its check");
    }

    #[test]
    fn forged_altered_and_expired_tokens_are_refused() {
        let k = key(1);
        let text = claims(Role::Spectator).sign(&k).unwrap();
        // Signed by someone else.
        assert_eq!(
            verify(&claims(Role::Player).sign(&key(2)).unwrap(), &k.verifying_key(), 1_100),
            Err(TokenError::BadSignature)
        );
        // One payload bit flipped (spectator → player).
        let mut bytes = URL_SAFE_NO_PAD.decode(&text).unwrap();
        bytes[17] ^= 1;
        assert_eq!(verify(&URL_SAFE_NO_PAD.encode(&bytes), &k.verifying_key(), 1_100), Err(TokenError::BadSignature));
        assert_eq!(
            verify(&text, &k.verifying_key(), 1_300),
            Err(TokenError::Expired { expired_at: 1_300, now: 1_300 })
        );
        assert_eq!(verify("not a token!", &k.verifying_key(), 0), Err(TokenError::Malformed));
        assert_eq!(verify(&"A".repeat(5000), &k.verifying_key(), 0), Err(TokenError::Malformed));
        let long = Claims { title: "x".repeat(65), ..claims(Role::Player) };
        assert_eq!(long.sign(&k), Err(TokenError::FieldTooLong("title")));
    }

    #[test]
    fn length_sweep_never_panics() {
        let k = key(3);
        let good = URL_SAFE_NO_PAD.decode(claims(Role::Player).sign(&k).unwrap()).unwrap();
        for len in 0..good.len() + 20 {
            let mut bytes: Vec<u8> = good.iter().copied().cycle().take(len).collect();
            if let Some(b) = bytes.get_mut(len / 2) {
                *b = b.wrapping_add(1);
            }
            let _ = verify(&URL_SAFE_NO_PAD.encode(&bytes), &k.verifying_key(), 0);
        }
    }
}
