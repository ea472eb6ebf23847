//! Who may connect: the origin allow-list and the request view given to the
//! authentication hook.
//!
//! Browsers send `Origin` on every WebSocket handshake and let any page open
//! a socket to any server, with the user's cookies. Without an origin check a
//! hostile page can talk to your server as the logged-in user (cross-site
//! WebSocket hijacking). Non-browser clients usually send no `Origin`; they
//! cannot carry a victim's cookies, so they are allowed unless
//! [`OriginPolicy::require_origin`] says otherwise.

use std::net::SocketAddr;

use http::{header, HeaderMap, Method, Uri};

/// An allow-list of origins: exact (`https://app.example.com`), any
/// subdomain (`https://*.example.com`), or `*` for any.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    allowed: Vec<String>,
    require_origin: bool,
}

impl OriginPolicy {
    /// Allows these origins (see the type's docs for the forms).
    pub fn allow<I, T>(origins: I) -> OriginPolicy
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        OriginPolicy {
            allowed: origins
                .into_iter()
                .map(|o| o.into().trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            require_origin: false,
        }
    }

    /// Also refuse requests without an `Origin` header.
    pub fn require_origin(mut self, require: bool) -> OriginPolicy {
        self.require_origin = require;
        self
    }

    /// Whether a request with this `Origin` value (or none) may connect.
    pub fn permits(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return !self.require_origin;
        };
        let origin = origin.trim().to_ascii_lowercase();
        self.allowed
            .iter()
            .any(|pattern| origin_matches(pattern, &origin))
    }
}

fn origin_matches(pattern: &str, origin: &str) -> bool {
    if pattern == "*" || pattern == origin {
        return true;
    }
    // `scheme://*.domain[:port]` matches `scheme://sub.domain[:port]` for
    // one or more labels, but not `scheme://domain` itself or a look-alike
    // such as `scheme://evildomain`.
    let Some((scheme, rest)) = pattern.split_once("://*.") else {
        return false;
    };
    let Some(host) = origin
        .strip_prefix(scheme)
        .and_then(|o| o.strip_prefix("://"))
    else {
        return false;
    };
    host.strip_suffix(rest).is_some_and(|sub| {
        sub.len() > 1 && sub.ends_with('.') && !sub[..sub.len() - 1].contains(['/', '@', ':'])
    })
}

/// The value of cookie `name` in a request's `Cookie` headers (RFC 6265
/// §5.4: `name=value` pairs separated by `; `), the first if it is there
/// twice.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// What the authentication hook sees of a handshake request.
#[derive(Debug, Clone)]
pub struct HandshakeRequest {
    /// The method (always GET for an upgrade).
    pub method: Method,
    /// Path and query.
    pub uri: Uri,
    /// All request headers.
    pub headers: HeaderMap,
    /// The TCP peer.
    pub peer: SocketAddr,
}

impl HandshakeRequest {
    /// The token of an `Authorization: Bearer ...` header.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    /// A cookie's value.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        cookie(&self.headers, name)
    }

    /// A query parameter's raw (not percent-decoded) value.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.uri
            .query()?
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// Subprotocols offered in `Sec-WebSocket-Protocol` (browsers can only
    /// pass a token this way; see docs/security.md).
    pub fn protocols(&self) -> impl Iterator<Item = &str> {
        self.headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
    }

    /// The `Origin` header.
    pub fn origin(&self) -> Option<&str> {
        self.headers.get(header::ORIGIN)?.to_str().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_wildcard_and_any() {
        let p = OriginPolicy::allow([
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:3000/",
        ]);
        assert!(p.permits(Some("https://app.example.com")));
        assert!(p.permits(Some("HTTPS://APP.EXAMPLE.COM")));
        assert!(!p.permits(Some("http://app.example.com")));
        assert!(!p.permits(Some("https://app.example.com.evil.net")));
        assert!(p.permits(Some("https://a.example.org")));
        assert!(p.permits(Some("https://a.b.example.org")));
        assert!(!p.permits(Some("https://example.org")));
        assert!(!p.permits(Some("https://evilexample.org")));
        assert!(!p.permits(Some("https://a.example.org.evil.net")));
        assert!(!p.permits(Some("https://a.example.org:8443")));
        assert!(p.permits(Some("http://localhost:3000")));
        assert!(!p.permits(Some("null")));
        assert!(p.permits(None));
        assert!(!p.clone().require_origin(true).permits(None));
        assert!(OriginPolicy::allow(["*"]).permits(Some("https://anything.test")));
    }

    #[test]
    fn token_carriers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer abc.def".parse().unwrap());
        headers.insert(header::COOKIE, "a=1; session=xyz; b=2".parse().unwrap());
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "chat, token.t0k3n".parse().unwrap(),
        );
        let req = HandshakeRequest {
            method: Method::GET,
            uri: "/ws?room=1&token=q1&flag".parse().unwrap(),
            headers,
            peer: "127.0.0.1:1".parse().unwrap(),
        };
        assert_eq!(req.bearer_token(), Some("abc.def"));
        assert_eq!(req.cookie("session"), Some("xyz"));
        assert_eq!(req.cookie("missing"), None);
        assert_eq!(req.query_param("token"), Some("q1"));
        assert_eq!(req.query_param("flag"), Some(""));
        assert_eq!(req.protocols().collect::<Vec<_>>(), ["chat", "token.t0k3n"]);
    }

    #[test]
    fn cookies_from_every_cookie_header() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, "a=1;b=\"two\"".parse().unwrap());
        headers.append(header::COOKIE, "c=x=y; a=shadowed".parse().unwrap());
        assert_eq!(cookie(&headers, "a"), Some("1"));
        assert_eq!(cookie(&headers, "b"), Some("two"));
        assert_eq!(cookie(&headers, "c"), Some("x=y"));
        assert_eq!(cookie(&headers, "x"), None);
        assert_eq!(cookie(&HeaderMap::new(), "a"), None);
    }
}
