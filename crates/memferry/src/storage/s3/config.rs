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
                    "S3 endpoint {e} is plain http and not on this machine: pass --s3-allow-http (or AWS_ALLOW_HTTP=true) to allow unencrypted requests"
                )));
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
            self.endpoint.as_deref().unwrap_or("aws"),
            self.region,
            if self.path_style { "path" } else { "virtual" },
            match (&self.access_key_id, &self.session_token) {
                (Some(_), Some(_)) => "env (with session token)",
                (Some(_), None) => "env",
                _ => "none",
            }
        )
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
