//! Where an issuer puts group names (`groups_claim`): a top-level claim by its exact
//! name, or an RFC 6901 JSON Pointer into nested claims.
//!
//! Providers do both. Okta and Auth0 name custom claims with URLs
//! (`https://example.com/groups`: dots and slashes in one top-level name); Keycloak puts
//! roles in nested objects (`realm_access.roles`, `resource_access.<client>.roles`, where
//! a client id may itself hold dots). A dotted path (`realm_access.roles`, the syntax of
//! oauth2-proxy and of Pomerium's flattened claim names) cannot tell those apart, and
//! "the exact name first, then the path" lets the token's shape choose which claim is
//! read. A JSON Pointer starts with `/`, which no top-level name in practice does, so
//! one setting names exactly one place whatever the token holds.

use serde_json::{Map, Value};

use super::AuthError;
use crate::reason::Reason;

/// A compiled `groups_claim`: a top-level claim name (`groups`,
/// `https://example.com/groups`), or, starting with `/`, a JSON Pointer through nested
/// objects (`/realm_access/roles`; `~1` spells a `/` in a name, `~0` a `~`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath {
    /// As configured: what messages and `policy diff` show.
    text: Box<str>,
    /// The member names from the payload down; one for a top-level claim.
    names: Box<[Box<str>]>,
}

// === impl ClaimPath ===

impl ClaimPath {
    /// `text` as configured, or why it names no claim: empty, an empty name in a
    /// pointer (`/realm_access//roles`, `/`), or a `~` not followed by `0` or `1`.
    pub fn parse(text: &str) -> Result<ClaimPath, String> {
        let names: Vec<Box<str>> = match text.strip_prefix('/') {
            None if text.is_empty() => return Err("names no claim (it is empty)".into()),
            None => vec![text.into()],
            Some(pointer) => pointer.split('/').map(unescape).collect::<Result<_, _>>()?,
        };
        Ok(ClaimPath { text: text.into(), names: names.into() })
    }

    /// As configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The top-level claim the path starts at: the name `_claim_names` gives when the
    /// provider holds it elsewhere (V25).
    pub fn top(&self) -> &str {
        self.names.first().map_or("", |n| n)
    }

    /// The value at the path in a token's `payload`. `Ok(None)` when a member on the way
    /// is absent or `null` (no groups, as for a token without a `groups` claim); an error
    /// when one on the way is not an object: the token does not have the shape the
    /// setting describes, and is refused as a malformed groups claim is.
    pub fn lookup<'a>(
        &self,
        payload: &'a Map<String, Value>,
    ) -> Result<Option<&'a Value>, AuthError> {
        let Some((last, parents)) = self.names.split_last() else {
            return Ok(None);
        };
        let mut object = payload;
        for name in parents {
            object = match object.get(&**name) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::Object(inner)) => inner,
                Some(_) => {
                    return Err(AuthError::new(
                        Reason::InvalidClaims,
                        "a member on the groups claim's path is not an object",
                    ))
                }
            };
        }
        Ok(object.get(&**last))
    }

    /// Puts `value` at the path in `payload`, making the objects on the way (replacing
    /// what is there otherwise): a `[[test]]` identity's `groups` shortcut, written
    /// where the issuer's tokens carry them.
    pub fn insert(&self, payload: &mut Map<String, Value>, value: Value) {
        let Some((last, parents)) = self.names.split_last() else {
            return;
        };
        let mut object = payload;
        for name in parents {
            let slot = object.entry(&**name).or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            let Value::Object(inner) = slot else { return };
            object = inner;
        }
        object.insert(last.to_string(), value);
    }
}

impl Default for ClaimPath {
    /// `groups`, the claim OpenID providers use.
    fn default() -> Self {
        ClaimPath { text: "groups".into(), names: Box::new(["groups".into()]) }
    }
}

impl std::fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// One reference token of a JSON Pointer, `~1` and `~0` decoded (RFC 6901 §4: `~1`
/// first, so `~01` is `~1`, not `/`).
fn unescape(token: &str) -> Result<Box<str>, String> {
    if token.is_empty() {
        return Err("has an empty name in its JSON Pointer (`//`, or a trailing `/`)".into());
    }
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        if c != '~' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('0') => out.push('~'),
            Some('1') => out.push('/'),
            _ => {
                return Err(
                    "has a `~` that is not `~0` (a `~`) or `~1` (a `/`) in its JSON Pointer".into(),
                )
            }
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// Names as written stay one top-level claim; a leading `/` reads a pointer.
    #[test]
    fn a_claim_path_is_a_name_or_a_json_pointer() {
        let token = payload(json!({
            "https://example.com/groups": ["url"],
            "realm_access.roles": ["dotted"],
            "realm_access": { "roles": ["nested"] },
            "resource_access": { "my.app": { "roles": ["client"] }, "a/b": { "~x": ["escaped"] } },
        }));
        let read = |text: &str| {
            ClaimPath::parse(text)
                .unwrap_or_else(|e| panic!("{text}: {e}"))
                .lookup(&token)
                .ok()
                .flatten()
                .cloned()
        };
        assert_eq!(read("https://example.com/groups"), Some(json!(["url"])));
        assert_eq!(read("realm_access.roles"), Some(json!(["dotted"])), "a name, never a path");
        assert_eq!(read("/realm_access/roles"), Some(json!(["nested"])));
        assert_eq!(read("/resource_access/my.app/roles"), Some(json!(["client"])));
        assert_eq!(read("/resource_access/a~1b/~0x"), Some(json!(["escaped"])));
        assert_eq!(read("/resource_access/other/roles"), None, "absent on the way");
        assert_eq!(
            ClaimPath::parse("/realm_access/roles").map(|p| p.top().to_string()),
            Ok("realm_access".into())
        );
    }

    #[test]
    fn a_claim_path_that_names_nothing_is_refused() {
        for bad in ["", "/", "/a//b", "/a/", "/a~2", "/a~"] {
            assert!(ClaimPath::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ClaimPath::parse("/a~01").map(|p| p.names.to_vec()), Ok(vec!["a~1".into()]));
    }

    /// A member on the way that is not an object is a malformed token (refused, as a
    /// groups claim that is not a list is); `null` on the way is an absent claim.
    #[test]
    fn a_claim_path_through_a_non_object_is_malformed() {
        let path = ClaimPath::parse("/realm_access/roles").unwrap_or_default();
        for shape in [json!("roles"), json!(["roles"]), json!(7), json!(true)] {
            let token = payload(json!({ "realm_access": shape }));
            assert!(path.lookup(&token).is_err(), "{shape}");
        }
        assert_eq!(path.lookup(&payload(json!({ "realm_access": null }))).ok(), Some(None));
    }

    #[test]
    fn inserting_at_a_claim_path_makes_the_objects_on_the_way() {
        let path = ClaimPath::parse("/resource_access/app/roles").unwrap_or_default();
        let mut token = payload(json!({ "resource_access": { "other": 1 } }));
        path.insert(&mut token, json!(["x"]));
        assert_eq!(
            Value::Object(token),
            json!({ "resource_access": { "other": 1, "app": { "roles": ["x"] } } })
        );
    }
}
