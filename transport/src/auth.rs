//! Client authentication for warren's TLS transports (pure; no I/O).
//!
//! Inside the TLS session the client's first request carries a token in an
//! ordinary-looking cookie. The token is
//!
//! ```text
//! base64url( ts u64 BE | nonce [16] | mode u8 | HMAC-SHA256(key, "warren/1" | ts | nonce | mode) )
//! ```
//!
//! where `key` is derived from the shared secret with HKDF-SHA256. The server
//! accepts a token only if its MAC verifies (constant time, `ring::hmac`),
//! its timestamp is within [`MAX_SKEW_SECS`] of the server's clock, its mode
//! is the server's, and its nonce has not been seen within the window (replay
//! protection). Anything else is answered like a plain web server would.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{hkdf, hmac};
use thiserror::Error;

/// Accepted clock difference between client and server, in seconds.
pub const MAX_SKEW_SECS: u64 = 120;
/// Raw token length (before base64).
pub const TOKEN_LEN: usize = 8 + 16 + 1 + 32;
/// Most nonces remembered; beyond this, new tokens are refused until old
/// ones expire (a flood of valid tokens needs the secret anyway).
pub const MAX_REMEMBERED_NONCES: usize = 100_000;
const DOMAIN: &[u8] = b"warren/1";

/// Which transport the token is for (a token for one mode never opens
/// another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One TLS connection per proxied stream.
    Tls = 1,
    /// One TLS session multiplexing many streams.
    TlsMux = 2,
}

impl Mode {
    fn from_byte(b: u8) -> Option<Mode> {
        match b {
            1 => Some(Mode::Tls),
            2 => Some(Mode::TlsMux),
            _ => None,
        }
    }
}

/// Why a token was refused. Never shown to the client (it gets the decoy);
/// logged by the server.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// Not a token at all.
    #[error("malformed token")]
    Malformed,
    /// Timestamp outside the accepted window.
    #[error("token timestamp {skew}s away from the server clock")]
    Stale {
        /// Seconds between token time and server time.
        skew: u64,
    },
    /// The MAC does not verify: wrong secret or tampering.
    #[error("token authentication failed")]
    BadMac,
    /// A valid token for the other mode.
    #[error("token is for another transport mode")]
    WrongMode,
    /// The nonce was used before.
    #[error("token replayed")]
    Replay,
    /// Too many recent tokens to remember another.
    #[error("replay cache full")]
    Busy,
}

/// The MAC key, derived from the shared secret.
pub struct AuthKey(hmac::Key);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(<redacted>)")
    }
}

impl AuthKey {
    /// Derives the key from a shared secret (HKDF-SHA256, fixed salt and
    /// info, so both ends derive the same key).
    pub fn derive(secret: &[u8]) -> AuthKey {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"warren transport auth salt v1");
        let prk = salt.extract(secret);
        let info: &[&[u8]] = &[b"warren transport auth key"];
        let mut out = [0u8; 32];
        // Expanding 32 bytes from SHA-256 HKDF cannot fail (limit 255*32).
        if let Ok(okm) = prk.expand(info, hkdf::HKDF_SHA256) {
            let _ = okm.fill(&mut out);
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, &out);
        out.fill(0);
        AuthKey(key)
    }

    fn mac(&self, ts: u64, nonce: &[u8; 16], mode: u8) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(DOMAIN);
        ctx.update(&ts.to_be_bytes());
        ctx.update(nonce);
        ctx.update(&[mode]);
        ctx.sign()
    }

    /// Makes a token for `mode` at time `now` (Unix seconds) with a fresh
    /// random `nonce`.
    pub fn token(&self, now: u64, nonce: [u8; 16], mode: Mode) -> String {
        let mut raw = Vec::with_capacity(TOKEN_LEN);
        raw.extend_from_slice(&now.to_be_bytes());
        raw.extend_from_slice(&nonce);
        raw.push(mode as u8);
        raw.extend_from_slice(self.mac(now, &nonce, mode as u8).as_ref());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks a token. On success the nonce is remembered in `seen`.
    pub fn verify(
        &self,
        token: &str,
        now: u64,
        expected: Mode,
        seen: &mut ReplayGuard,
    ) -> Result<(), AuthError> {
        if token.len() > 2 * TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| AuthError::Malformed)?;
        if raw.len() != TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        let ts = u64::from_be_bytes(ts);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&raw[8..24]);
        let mode = raw[24];
        let mut ctx_input = Vec::with_capacity(DOMAIN.len() + 25);
        ctx_input.extend_from_slice(DOMAIN);
        ctx_input.extend_from_slice(&raw[..25]);
        // Constant-time comparison of the MAC.
        hmac::verify(&self.0, &ctx_input, &raw[25..]).map_err(|_| AuthError::BadMac)?;
        let skew = now.abs_diff(ts);
        if skew > MAX_SKEW_SECS {
            return Err(AuthError::Stale { skew });
        }
        if Mode::from_byte(mode) != Some(expected) {
            return Err(AuthError::WrongMode);
        }
        seen.check_and_remember(nonce, now)
    }
}

/// Nonces seen within the skew window.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: HashMap<[u8; 16], u64>,
}

impl ReplayGuard {
    fn check_and_remember(&mut self, nonce: [u8; 16], now: u64) -> Result<(), AuthError> {
        if self.seen.len() >= MAX_REMEMBERED_NONCES {
            self.seen.retain(|_, expiry| *expiry > now);
        }
        if self.seen.get(&nonce).is_some_and(|&expiry| expiry > now) {
            return Err(AuthError::Replay);
        }
        if self.seen.len() >= MAX_REMEMBERED_NONCES {
            return Err(AuthError::Busy);
        }
        // A token is valid until ts + skew at the latest; remember it that
        // long after now to be safe.
        self.seen.insert(nonce, now + 2 * MAX_SKEW_SECS + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_790_000_000;

    #[test]
    fn valid_token_once() {
        let key = AuthKey::derive(b"correct horse");
        let mut seen = ReplayGuard::default();
        let t = key.token(NOW, [7; 16], Mode::Tls);
        assert_eq!(key.verify(&t, NOW + 3, Mode::Tls, &mut seen), Ok(()));
        assert_eq!(
            key.verify(&t, NOW + 4, Mode::Tls, &mut seen),
            Err(AuthError::Replay)
        );
    }

    #[test]
    fn wrong_secret_mode_and_time() {
        let key = AuthKey::derive(b"correct horse");
        let other = AuthKey::derive(b"wrong horse");
        let mut seen = ReplayGuard::default();
        let t = other.token(NOW, [1; 16], Mode::Tls);
        assert_eq!(
            key.verify(&t, NOW, Mode::Tls, &mut seen),
            Err(AuthError::BadMac)
        );
        let t = key.token(NOW, [2; 16], Mode::TlsMux);
        assert_eq!(
            key.verify(&t, NOW, Mode::Tls, &mut seen),
            Err(AuthError::WrongMode)
        );
        let t = key.token(NOW - MAX_SKEW_SECS - 1, [3; 16], Mode::Tls);
        assert!(matches!(
            key.verify(&t, NOW, Mode::Tls, &mut seen),
            Err(AuthError::Stale { .. })
        ));
    }

    #[test]
    fn tampering_is_caught() {
        let key = AuthKey::derive(b"s");
        let mut seen = ReplayGuard::default();
        let t = key.token(NOW, [9; 16], Mode::Tls);
        let mut raw = URL_SAFE_NO_PAD.decode(&t).expect("b64");
        raw[0] ^= 1; // shift the timestamp
        let t2 = URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(
            key.verify(&t2, NOW, Mode::Tls, &mut seen),
            Err(AuthError::BadMac)
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics_or_passes(s in ".{0,200}") {
            let key = AuthKey::derive(b"k");
            let mut seen = ReplayGuard::default();
            prop_assert!(key.verify(&s, NOW, Mode::Tls, &mut seen).is_err());
        }
    }
}
