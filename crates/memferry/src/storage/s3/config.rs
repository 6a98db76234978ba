//! S3 client configuration: the standard AWS environment, then explicit
//! overrides (command-line flags).
//!
//! Guarantee: secrets (the secret access key and the session token) are held
//! in [`Secret`], whose `Debug` and `Display` print `***`; nothing in this
//! crate logs or formats them, and error messages never include them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Result};

/// A credential that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, only for handing to the signer.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How failed requests are retried: 5xx, throttling (429/503 SlowDown),
/// timeouts and broken connections are retried with exponential backoff
/// until `max_retries` or `total` has passed since the first attempt; then
/// the request fails with a clear error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries per request (0 disables retrying).
    pub max_retries: usize,
    /// Bound on the time spent retrying one request.
    pub total: Duration,
    /// First backoff delay (doubled per retry, with jitter).
    pub initial_backoff: Duration,
    /// Timeout of one HTTP request (including its body).
    pub request_timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 10,
            total: Duration::from_secs(120),
            initial_backoff: Duration::from_millis(100),
            request_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The AWS environment settings of role credentials, used when no access
/// key is given (none of them is a secret: they name files and endpoints
/// that hold or hand out the credentials).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleCredentials {
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` (EKS IRSA: AssumeRoleWithWebIdentity).
    pub web_identity_token_file: Option<String>,
    /// `AWS_ROLE_ARN`, the role the web identity assumes.
    pub role_arn: Option<String>,
    /// `AWS_ROLE_SESSION_NAME`.
    pub role_session_name: Option<String>,
    /// `AWS_ENDPOINT_URL_STS`, a custom STS endpoint for the web identity.
    pub sts_endpoint: Option<String>,
    /// `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` (ECS task roles).
    pub container_relative_uri: Option<String>,
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI` (EKS Pod Identity).
    pub container_full_uri: Option<String>,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, the token for the full URI.
    pub container_token_file: Option<String>,
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT`, the instance metadata endpoint.
    pub metadata_endpoint: Option<String>,
}

impl RoleCredentials {
    fn from_env() -> Self {
        Self {
            web_identity_token_file: env("AWS_WEB_IDENTITY_TOKEN_FILE"),
            role_arn: env("AWS_ROLE_ARN"),
            role_session_name: env("AWS_ROLE_SESSION_NAME"),
            sts_endpoint: env("AWS_ENDPOINT_URL_STS"),
            container_relative_uri: env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
            container_full_uri: env("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            container_token_file: env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
            metadata_endpoint: env("AWS_EC2_METADATA_SERVICE_ENDPOINT"),
        }
    }

    /// The source these settings select, in the order object_store tries
    /// them; `None` when none is configured.
    pub fn source(&self) -> Option<&'static str> {
        if self.web_identity_token_file.is_some() && self.role_arn.is_some() {
            Some("web identity")
        } else if self.container_relative_uri.is_some() {
            Some("ECS container role")
        } else if self.container_full_uri.is_some() && self.container_token_file.is_some() {
            Some("EKS pod identity")
        } else {
            None
        }
    }
}

/// Everything needed to talk to an S3-compatible server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Endpoint URL (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`); `None` is AWS.
    pub endpoint: Option<String>,
    /// Region (`AWS_REGION`, `AWS_DEFAULT_REGION`; default `us-east-1`).
    pub region: String,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<Secret>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<Secret>,
    /// Where credentials come from when no access key is given: the AWS
    /// role settings of the environment (web identity, ECS/EKS container
    /// credentials, instance metadata).
    pub role: RoleCredentials,
    /// PEM bundle of extra trusted CA certificates (`AWS_CA_BUNDLE`).
    pub ca_bundle: Option<PathBuf>,
    /// Path-style addressing (`endpoint/bucket/key`) instead of
    /// virtual-hosted style (`bucket.endpoint/key`). Default: path style
    /// for custom endpoints, virtual-hosted for AWS
    /// (`AWS_S3_ADDRESSING_STYLE=path|virtual` sets it).
    pub path_style: bool,
    /// Allow plain `http://` endpoints. Default: only for loopback endpoints
    /// (`AWS_ALLOW_HTTP=true` allows any).
    pub allow_http: bool,
    /// Use conditional PUTs (If-None-Match / If-Match) for the manifest
    /// commit (`MEMFERRY_S3_CONDITIONAL_PUT=false` turns them off for
    /// servers that reject them).
    pub conditional_put: bool,
    /// Requests in flight at once (parts of uploads, ranged GETs, HEADs).
    pub concurrency: usize,
    /// Retry behaviour.
    pub retry: RetryPolicy,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            role: RoleCredentials::default(),
            ca_bundle: None,
            path_style: false,
            allow_http: false,
            conditional_put: true,
            concurrency: 16,
            retry: RetryPolicy::default(),
        }
    }
}

/// Overrides given explicitly (flags); `None` keeps the environment's value.
#[derive(Debug, Clone, Default)]
pub struct S3Overrides {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub ca_bundle: Option<PathBuf>,
    pub path_style: Option<bool>,
    pub allow_http: Option<bool>,
    pub conditional_put: Option<bool>,
    pub concurrency: Option<usize>,
    pub max_retries: Option<usize>,
    pub retry_total: Option<Duration>,
    pub request_timeout: Option<Duration>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_bool(name: &str) -> Result<Option<bool>> {
    match env(name) {
        None => Ok(None),
        Some(v) => parse_bool(&v)
            .map(Some)
            .ok_or_else(|| Error::InvalidInput(format!("{name}={v:?}: use true or false"))),
    }
}

/// Parses `true/false/1/0/yes/no`.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

impl S3Config {
    /// Reads the standard AWS environment, then applies `o`. Validates the
    /// result (endpoint URL, plain http only where allowed, a readable CA
    /// bundle); errors are bad input.
    pub fn from_env(o: &S3Overrides) -> Result<Self> {
        let mut c = S3Config {
            endpoint: env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")),
            region: env("AWS_REGION")
                .or_else(|| env("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            access_key_id: env("AWS_ACCESS_KEY_ID"),
            secret_access_key: env("AWS_SECRET_ACCESS_KEY").map(Secret),
            session_token: env("AWS_SESSION_TOKEN").map(Secret),
            role: RoleCredentials::from_env(),
            ca_bundle: env("AWS_CA_BUNDLE").map(PathBuf::from),
            ..S3Config::default()
        };
        let style = env("AWS_S3_ADDRESSING_STYLE");
        let path_style = match style.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("auto") => None,
            Some("path") => Some(true),
            Some("virtual") => Some(false),
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "AWS_S3_ADDRESSING_STYLE={other:?}: use path or virtual"
                )));
            }
        };
        let allow_http = env_bool("AWS_ALLOW_HTTP")?;
        let conditional = env_bool("MEMFERRY_S3_CONDITIONAL_PUT")?;
        if let Some(e) = &o.endpoint {
            c.endpoint = Some(e.clone());
        }
        if let Some(r) = &o.region {
            c.region = r.clone();
        }
        if let Some(b) = &o.ca_bundle {
            c.ca_bundle = Some(b.clone());
        }
        c.path_style = o.path_style.or(path_style).unwrap_or(c.endpoint.is_some());
        let loopback = c.endpoint.as_deref().is_some_and(is_loopback_http);
        c.allow_http = o.allow_http.or(allow_http).unwrap_or(loopback);
        c.conditional_put = o.conditional_put.or(conditional).unwrap_or(true);
        if let Some(n) = o.concurrency {
            c.concurrency = n;
        }
        if let Some(n) = o.max_retries {
            c.retry.max_retries = n;
        }
        if let Some(t) = o.retry_total {
            c.retry.total = t;
        }
        if let Some(t) = o.request_timeout {
            c.retry.request_timeout = t;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the settings that can be checked without a request.
    pub fn validate(&self) -> Result<()> {
        if let Some(e) = &self.endpoint {
            let lower = e.to_ascii_lowercase();
            if !(lower.starts_with("http://") || lower.starts_with("https://")) {
                return Err(Error::InvalidInput(format!(
                    "S3 endpoint {e:?} must start with http:// or https://"
                )));
            }
            if lower.starts_with("http://") && !self.allow_http {
                return Err(Error::InvalidInput(format!(
                    "S3 endpoint {} is plain http and not on this machine: pass --s3-allow-http (or AWS_ALLOW_HTTP=true) to allow unencrypted requests",
                    redact_endpoint(e)
                )));
            }
            if !self.path_style {
                // Virtual-hosted requests go to BUCKET.HOST: a name the
                // bucket can be put in front of.
                let host = endpoint_parts(e).host;
                if host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
                    return Err(Error::InvalidInput(format!(
                        "S3 endpoint {} is an IP address, so virtual-hosted addressing (bucket.{host}) cannot work: use path-style addressing (--s3-path-style true, or AWS_S3_ADDRESSING_STYLE=path) or an endpoint with a DNS name",
                        redact_endpoint(e)
                    )));
                }
            }
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            return Err(Error::InvalidInput(format!(
                "S3 concurrency {} is out of range: use 1..=1024",
                self.concurrency
            )));
        }
        if let Some(b) = &self.ca_bundle
            && let Err(e) = std::fs::metadata(b)
        {
            return Err(Error::InvalidInput(format!(
                "CA bundle {} cannot be read ({e}): fix AWS_CA_BUNDLE or --s3-ca-bundle",
                b.display()
            )));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(Error::InvalidInput(
                "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither".into(),
            ));
        }
        Ok(())
    }

    /// One line describing the configuration, safe to print (no secrets).
    pub fn describe(&self) -> String {
        format!(
            "endpoint={} region={} addressing={} credentials={}",
            self.endpoint
                .as_deref()
                .map_or_else(|| "aws".to_string(), redact_endpoint),
            self.region,
            if self.path_style { "path" } else { "virtual" },
            match (&self.access_key_id, &self.session_token) {
                (Some(_), Some(_)) => "env (with session token)",
                (Some(_), None) => "env",
                _ => match self.role.source() {
                    Some(s) => s,
                    None if self.endpoint.is_some() => "none (anonymous)",
                    None => "instance metadata",
                },
            }
        )
    }
}

/// The pieces of an endpoint URL `scheme://[userinfo@]host[:port][/path]`.
pub(crate) struct EndpointParts<'a> {
    pub scheme: &'a str,
    pub userinfo: Option<&'a str>,
    /// The host, with the brackets of an IPv6 address.
    pub host: &'a str,
    /// `:port` or empty.
    pub port: &'a str,
    /// `/path...` or empty (never just `/`).
    pub path: &'a str,
}

pub(crate) fn endpoint_parts(endpoint: &str) -> EndpointParts<'_> {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("", endpoint));
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let path = path.trim_end_matches('/');
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (host, port) = if hostport.starts_with('[') {
        match hostport.find(']') {
            Some(i) => hostport.split_at(i + 1),
            None => (hostport, ""),
        }
    } else {
        match hostport.rfind(':') {
            Some(i) => hostport.split_at(i),
            None => (hostport, ""),
        }
    };
    EndpointParts {
        scheme,
        userinfo,
        host,
        port,
        path,
    }
}

/// The endpoint with any `user:password@` replaced by `***@`, for messages.
pub fn redact_endpoint(endpoint: &str) -> String {
    let p = endpoint_parts(endpoint);
    match p.userinfo {
        None => endpoint.to_string(),
        Some(_) => {
            let rest = &endpoint[endpoint.find('@').map_or(0, |i| i + 1)..];
            format!("{}://***@{rest}", p.scheme)
        }
    }
}

/// True for `http://127.x.x.x`, `http://localhost` and `http://[::1]`.
fn is_loopback_http(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parses a duration such as `500ms`, `30s`, `5m`, `1h` (a bare number is
/// seconds).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        Error::InvalidInput(format!("invalid duration {s:?}: use e.g. 30s, 5m, 1h"))
    })?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(Error::InvalidInput(format!(
                "invalid duration unit {other:?} in {s:?}: use ms, s, m or h"
            )));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(Error::InvalidInput(format!("invalid duration {s:?}")));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let c = S3Config {
            secret_access_key: Some(Secret::new("TOPSECRET")),
            session_token: Some(Secret::new("TOKENSECRET")),
            access_key_id: Some("AKID".into()),
            ..S3Config::default()
        };
        let shown = format!("{c:?} {}", c.describe());
        assert!(!shown.contains("TOPSECRET") && !shown.contains("TOKENSECRET"));
    }

    #[test]
    fn endpoint_userinfo_is_never_described() {
        let c = S3Config {
            endpoint: Some("https://user:PASSWORD@minio.example.com:9000/base".into()),
            path_style: true,
            ..S3Config::default()
        };
        let shown = c.describe();
        assert!(
            !shown.contains("PASSWORD") && !shown.contains("user:"),
            "{shown}"
        );
        assert!(
            shown.contains("https://***@minio.example.com:9000/base"),
            "{shown}"
        );
        assert_eq!(redact_endpoint("http://127.0.0.1:9"), "http://127.0.0.1:9");
    }

    #[test]
    fn endpoints_split_into_their_parts() {
        let p = endpoint_parts("https://u:p@host.example:8443/a/b/");
        assert_eq!(
            (p.scheme, p.userinfo, p.host, p.port, p.path),
            ("https", Some("u:p"), "host.example", ":8443", "/a/b")
        );
        let p = endpoint_parts("http://[::1]:9000");
        assert_eq!((p.host, p.port, p.path), ("[::1]", ":9000", ""));
        let p = endpoint_parts("https://minio.local/");
        assert_eq!((p.host, p.port, p.path), ("minio.local", "", ""));
    }

    #[test]
    fn virtual_hosted_addressing_needs_a_dns_name() {
        let with = |endpoint: &str| S3Config {
            endpoint: Some(endpoint.into()),
            allow_http: true,
            path_style: false,
            ..S3Config::default()
        };
        for ip in ["http://127.0.0.1:9000", "http://[::1]:9000"] {
            let e = with(ip).validate().unwrap_err().to_string();
            assert!(e.contains("path-style"), "{e}");
        }
        with("https://minio.example.com").validate().unwrap();
    }

    #[test]
    fn role_credentials_come_from_the_environment_settings() {
        let r = RoleCredentials {
            web_identity_token_file: Some("/var/run/token".into()),
            role_arn: Some("arn:aws:iam::1:role/r".into()),
            ..RoleCredentials::default()
        };
        assert_eq!(r.source(), Some("web identity"));
        let r = RoleCredentials {
            container_relative_uri: Some("/v2/credentials/x".into()),
            ..RoleCredentials::default()
        };
        assert_eq!(r.source(), Some("ECS container role"));
        assert_eq!(RoleCredentials::default().source(), None);
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_http("http://127.0.0.1:9000"));
        assert!(is_loopback_http("http://localhost:9000/"));
        assert!(is_loopback_http("http://[::1]:9000"));
        assert!(!is_loopback_http("http://10.0.0.1:9000"));
        assert!(!is_loopback_http("https://127.0.0.1"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
