//! Development helpers: the embedded OIDC issuer and its signing keys, used by
//! `portcullis demo`, `portcullis dev token` and the tests.

pub mod demo;
pub mod echo;
pub mod floor;
pub mod issuer;
pub mod login;
pub mod signer;
pub mod token;
