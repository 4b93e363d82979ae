//! WireGuard keys: the private key (wiped on drop, never shown) and public
//! keys, as base64 text.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// What a WireGuard key looks like, for error messages.
pub(super) const KEY_SHAPE: &str =
    "a key is 44 base64 characters ending in '=', as `wg genkey` prints";

// ---------------------------------------------------------------------------
// Keys

/// Why a base64 string is not a WireGuard key. Never carries the value.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// Nothing there.
    #[error("is empty")]
    Empty,
    /// Not standard, padded base64.
    #[error("is not valid base64")]
    Base64,
    /// Valid base64 of the wrong number of bytes.
    #[error("decodes to {0} bytes instead of 32")]
    Length(usize),
}

/// Decodes a base64 WireGuard key; the intermediate buffer is zeroized.
pub(super) fn decode_key(s: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    if s.is_empty() {
        return Err(KeyError::Empty);
    }
    let bytes = Zeroizing::new(
        STANDARD
            .decode(s.as_bytes())
            .map_err(|_| KeyError::Base64)?,
    );
    if bytes.len() != 32 {
        return Err(KeyError::Length(bytes.len()));
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// A secret WireGuard key (`PrivateKey`, `PresharedKey`): 32 bytes,
/// zeroized on drop. `Debug` prints `Key(<redacted>)`; serde reads and
/// writes it as base64 (only to hand it to the instance worker).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; 32]);

impl Key {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses standard, padded base64 of exactly 32 bytes (what `wg genkey`
    /// prints).
    pub fn from_base64(s: &str) -> Result<Key, KeyError> {
        decode_key(s).map(|k| Key(*k))
    }

    /// The key as base64. Only for sending it to the worker: the string is
    /// not zeroized unless the caller wraps it in [`Zeroizing`].
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Whether every byte is zero (WireGuard's "no key").
    pub fn is_zero(&self) -> bool {
        self.0.iter().fold(0u8, |acc, b| acc | b) == 0
    }
}

impl PartialEq for Key {
    /// Compares in constant time.
    fn eq(&self, other: &Key) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let b64 = Zeroizing::new(self.to_base64());
        serializer.serialize_str(&b64)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        let s = Zeroizing::new(String::deserialize(deserializer)?);
        Key::from_base64(&s).map_err(|e| serde::de::Error::custom(format!("secret key {e}")))
    }
}

/// A public WireGuard key (a peer's `PublicKey`, or the interface's own).
/// Not secret: `Debug` and `Display` print it as base64, as `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey32(pub [u8; 32]);

impl PublicKey32 {
    /// Parses standard, padded base64 of exactly 32 bytes.
    pub fn from_base64(s: &str) -> Result<PublicKey32, KeyError> {
        decode_key(s).map(|k| PublicKey32(*k))
    }

    /// The key as base64.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The public key of a private key (X25519 base point multiplication,
    /// with the usual clamping).
    pub fn from_private(private: &Key) -> PublicKey32 {
        let secret = boringtun::x25519::StaticSecret::from(*private.as_bytes());
        PublicKey32(boringtun::x25519::PublicKey::from(&secret).to_bytes())
    }
}

impl fmt::Display for PublicKey32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey32({})", self.to_base64())
    }
}

impl FromStr for PublicKey32 {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<PublicKey32, KeyError> {
        PublicKey32::from_base64(s)
    }
}

impl Serialize for PublicKey32 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey32 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PublicKey32, D::Error> {
        let s = String::deserialize(deserializer)?;
        PublicKey32::from_base64(&s)
            .map_err(|e| serde::de::Error::custom(format!("public key {e}")))
    }
}
