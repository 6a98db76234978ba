//! A blocking client for one bucket: PUT (plain, create-only, if-match),
//! GET (whole or ranged, streamed), HEAD (one or many, bounded in flight),
//! LIST, DELETE and multipart uploads.
//!
//! The client owns its tokio runtime; async never leaks out of this module
//! and [`ObjectClient::run`] (crate-internal) is the only way in. Every
//! request is retried with exponential backoff on 5xx, throttling, timeouts
//! and broken connections, bounded by [`RetryPolicy`](super::RetryPolicy)
//! (total time and count), and then fails with an
//! [`Error::ObjectStore`] naming the request and the object and saying what
//! to check. This is the seam the KV store reuses for blocks on S3.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{
    AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer, S3ConditionalPut,
};
use object_store::client::{
    HttpClient, HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector,
};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};

use super::config::{S3Config, endpoint_parts};
use crate::{Error, Result};

/// What a HEAD or LIST says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key inside the bucket.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// ETag, when the server sends one.
    pub e_tag: Option<String>,
    /// Last modification, milliseconds since the Unix epoch.
    pub modified_unix_ms: u64,
}

/// The condition of a PUT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutCondition {
    /// Replace whatever is there (atomic: readers see old or new).
    Overwrite,
    /// Create only: fail with [`Error::Conflict`] when the key exists.
    Create,
    /// Replace only the version with this ETag, else [`Error::Conflict`].
    IfMatch(String),
}

/// A blocking S3 client bound to one bucket.
pub struct ObjectClient {
    rt: tokio::runtime::Runtime,
    store: Arc<AmazonS3>,
    bucket: String,
    config: S3Config,
    /// `scheme://host[/path]` of the bucket itself (path style: the
    /// endpoint and the bucket; virtual-hosted: the bucket in the host).
    bucket_endpoint: String,
    /// For the one request object_store has no call for
    /// (ListMultipartUploads).
    http: HttpClient,
}

/// The URL of `bucket` itself: what object_store calls the bucket endpoint
/// (it puts the bucket into a custom endpoint only for path-style requests;
/// virtual-hosted requests need `scheme://BUCKET.host`, built here).
pub(crate) fn bucket_endpoint(config: &S3Config, bucket: &str) -> String {
    match &config.endpoint {
        Some(e) if config.path_style => format!("{}/{bucket}", e.trim_end_matches('/')),
        Some(e) => {
            let p = endpoint_parts(e);
            let userinfo = p.userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            format!(
                "{}://{userinfo}{bucket}.{}{}{}",
                p.scheme, p.host, p.port, p.path
            )
        }
        None if config.path_style => format!("https://s3.{}.amazonaws.com/{bucket}", config.region),
        None => format!("https://{bucket}.s3.{}.amazonaws.com", config.region),
    }
}

impl std::fmt::Debug for ObjectClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ObjectClient(s3://{} {})",
            self.bucket,
            self.config.describe()
        )
    }
}

impl ObjectClient {
    /// Builds a client for `bucket`; makes no request.
    pub fn new(config: &S3Config, bucket: &str) -> Result<Self> {
        config.validate()?;
        let r = &config.retry;
        let mut options = ClientOptions::new()
            .with_allow_http(config.allow_http)
            .with_timeout(r.request_timeout)
            .with_connect_timeout(r.connect_timeout)
            .with_pool_max_idle_per_host(config.concurrency.max(16));
        if let Some(path) = &config.ca_bundle {
            let pem = std::fs::read(path)
                .map_err(|e| Error::io(format!("reading CA bundle {}", path.display()), e))?;
            let certs = object_store::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::InvalidInput(format!(
                    "CA bundle {} holds no usable PEM certificates: {e}",
                    path.display()
                ))
            })?;
            for c in certs {
                options = options.with_root_certificate(c);
            }
        }
        let bucket_endpoint = bucket_endpoint(config, bucket);
        let http = ReqwestConnector::default()
            .connect(&options)
            .map_err(|e| Error::InvalidInput(format!("invalid S3 client options: {e}")))?;
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_allow_http(config.allow_http)
            .with_client_options(options)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: r.initial_backoff,
                    max_backoff: (r.total / 4).max(r.initial_backoff),
                    base: 2.0,
                },
                max_retries: r.max_retries,
                retry_timeout: r.total,
            });
        if !config.conditional_put {
            b = b.with_conditional_put(S3ConditionalPut::Disabled);
        }
        if let Some(e) = &config.endpoint {
            // Virtual-hosted: object_store takes a custom endpoint as the
            // bucket's own, so it gets the bucket in its host.
            b = b.with_endpoint(if config.path_style {
                e.trim_end_matches('/').to_string()
            } else {
                bucket_endpoint.clone()
            });
        }
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => {
                b = b
                    .with_access_key_id(id)
                    .with_secret_access_key(secret.expose());
                if let Some(t) = &config.session_token {
                    b = b.with_token(t.expose());
                }
            }
            // No access key: the role settings of the environment (web
            // identity, ECS or EKS container credentials), handed to
            // object_store, which then fetches and refreshes credentials
            // itself; without any, a custom endpoint gets anonymous
            // requests (public buckets, test servers) and AWS the instance
            // metadata credentials.
            _ => {
                let r = &config.role;
                for (key, value) in [
                    (
                        AmazonS3ConfigKey::WebIdentityTokenFile,
                        &r.web_identity_token_file,
                    ),
                    (AmazonS3ConfigKey::RoleArn, &r.role_arn),
                    (AmazonS3ConfigKey::RoleSessionName, &r.role_session_name),
                    (AmazonS3ConfigKey::StsEndpoint, &r.sts_endpoint),
                    (
                        AmazonS3ConfigKey::ContainerCredentialsRelativeUri,
                        &r.container_relative_uri,
                    ),
                    (
                        AmazonS3ConfigKey::ContainerCredentialsFullUri,
                        &r.container_full_uri,
                    ),
                    (
                        AmazonS3ConfigKey::ContainerAuthorizationTokenFile,
                        &r.container_token_file,
                    ),
                    (AmazonS3ConfigKey::MetadataEndpoint, &r.metadata_endpoint),
                ] {
                    if let Some(v) = value {
                        b = b.with_config(key, v);
                    }
                }
                if config.endpoint.is_some() && r.source().is_none() {
                    b = b.with_skip_signature(true);
                }
            }
        }
        let store = b.build().map_err(|e| {
            Error::InvalidInput(format!("invalid S3 configuration for bucket {bucket}: {e}"))
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("memferry-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the S3 I/O runtime", e))?;
        Ok(Self {
            rt,
            store: Arc::new(store),
            bucket: bucket.to_string(),
            config: config.clone(),
            bucket_endpoint,
            http,
        })
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The configuration (secrets redacted when printed).
    pub fn config(&self) -> &S3Config {
        &self.config
    }

    /// `s3://bucket/key`, for messages.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// Runs `f` to completion on the client's runtime (crate-internal: the
    /// only bridge from blocking code into async).
    pub(crate) fn run<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The underlying store, for async code run through [`Self::run`].
    pub(crate) fn store(&self) -> &AmazonS3 {
        &self.store
    }

    /// Maps an object_store error to ours, naming the request.
    pub(crate) fn error(&self, op: &str, key: &str, e: object_store::Error) -> Error {
        map_error(op, &self.url(key), e)
    }

    /// Reads a whole object; `None` when it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<(Bytes, ObjectInfo)>> {
        let path = ObjectPath::from(key);
        self.run(async {
            match self.store.get(&path).await {
                Ok(r) => {
                    let info = info(&r.meta);
                    let bytes = r.bytes().await.map_err(|e| self.error("GET", key, e))?;
                    Ok(Some((bytes, info)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.error("GET", key, e)),
            }
        })
    }

    /// Reads `range` of an object.
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = ObjectPath::from(key);
        self.run(async {
            self.store
                .get_range(&path, range.clone())
                .await
                .map_err(|e| self.error(&format!("GET bytes {range:?}"), key, e))
        })
    }

    /// HEAD of one object; `None` when it does not exist.
    pub fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.run(self.head_async(key))
    }

    pub(crate) async fn head_async(&self, key: &str) -> Result<Option<ObjectInfo>> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(m) => Ok(Some(info(&m))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("HEAD", key, e)),
        }
    }

    /// HEADs of many objects, at most `concurrency` in flight, results in
    /// the order of `keys` (for lookups: never one blocking request per key).
    pub fn head_many(&self, keys: &[String]) -> Vec<Result<Option<ObjectInfo>>> {
        self.run(
            futures::stream::iter(keys.iter().map(|k| self.head_async(k)))
                .buffered(self.config.concurrency)
                .collect(),
        )
    }

    /// Writes a whole object under `cond`.
    pub fn put(&self, key: &str, body: Bytes, cond: PutCondition) -> Result<ObjectInfo> {
        let path = ObjectPath::from(key);
        let size = body.len() as u64;
        if cond != PutCondition::Overwrite && !self.config.conditional_put {
            return Err(Error::InvalidInput(format!(
                "a conditional PUT of {} was asked for, but conditional PUTs are off (MEMFERRY_S3_CONDITIONAL_PUT=false)",
                self.url(key)
            )));
        }
        let mode = match &cond {
            PutCondition::Overwrite => PutMode::Overwrite,
            PutCondition::Create => PutMode::Create,
            PutCondition::IfMatch(tag) => PutMode::Update(UpdateVersion {
                e_tag: Some(tag.clone()),
                version: None,
            }),
        };
        self.run(async {
            let r = self
                .store
                .put_opts(&path, PutPayload::from(body), PutOptions::from(mode))
                .await;
            match r {
                Ok(r) => Ok(ObjectInfo {
                    key: key.to_string(),
                    size,
                    e_tag: r.e_tag,
                    modified_unix_ms: crate::units::now_ms(),
                }),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => Err(Error::Conflict(format!(
                    "{} was written by someone else meanwhile (conditional PUT refused)",
                    self.url(key)
                ))),
                Err(e) => Err(self.error("PUT", key, e)),
            }
        })
    }

    /// Deletes an object (deleting a missing object succeeds).
    pub fn delete(&self, key: &str) -> Result<()> {
        self.run(self.delete_async(key))
    }

    pub(crate) async fn delete_async(&self, key: &str) -> Result<()> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("DELETE", key, e)),
        }
    }

    /// Deletes many objects, bounded in flight; the first error wins after
    /// every deletion was attempted.
    pub fn delete_many(&self, keys: &[String]) -> Result<()> {
        let results: Vec<Result<()>> = self.run(
            futures::stream::iter(keys.iter().map(|k| self.delete_async(k)))
                .buffer_unordered(self.config.concurrency)
                .collect(),
        );
        results.into_iter().collect()
    }

    /// Every object under `prefix` (a `/`-terminated key prefix).
    pub fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let p = ObjectPath::from(prefix.trim_end_matches('/'));
        self.run(async {
            self.store
                .list(Some(&p))
                .map_ok(|m| info(&m))
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| self.error("LIST", prefix, e))
        })
    }

    /// Starts a multipart upload; returns its upload id.
    pub fn create_multipart(&self, key: &str) -> Result<String> {
        self.run(self.create_multipart_async(key))
    }

    pub(crate) async fn create_multipart_async(&self, key: &str) -> Result<String> {
        self.store
            .create_multipart(&ObjectPath::from(key))
            .await
            .map_err(|e| self.error("CreateMultipartUpload", key, e))
    }

    /// Uploads part `idx` (0-based) of an upload.
    pub(crate) async fn put_part_async(
        &self,
        key: &str,
        upload: &str,
        idx: usize,
        body: Bytes,
    ) -> Result<PartId> {
        self.store
            .put_part(
                &ObjectPath::from(key),
                &upload.to_string(),
                idx,
                PutPayload::from(body),
            )
            .await
            .map_err(|e| self.error(&format!("UploadPart {}", idx + 1), key, e))
    }

    /// Completes an upload: the object appears whole, atomically.
    pub(crate) async fn complete_multipart_async(
        &self,
        key: &str,
        upload: &str,
        parts: Vec<PartId>,
    ) -> Result<()> {
        self.store
            .complete_multipart(&ObjectPath::from(key), &upload.to_string(), parts)
            .await
            .map(|_| ())
            .map_err(|e| self.error("CompleteMultipartUpload", key, e))
    }

    /// The multipart uploads in progress under `prefix`, as `(key, upload
    /// id)`; `Ok(None)` when the server does not implement
    /// ListMultipartUploads (it answers 501 or 405).
    pub fn list_multipart_uploads(&self, prefix: &str) -> Result<Option<Vec<(String, String)>>> {
        self.run(self.list_multipart_uploads_async(prefix))
    }

    async fn list_multipart_uploads_async(
        &self,
        prefix: &str,
    ) -> Result<Option<Vec<(String, String)>>> {
        let fail = |message: String| Error::ObjectStore {
            context: format!("S3 ListMultipartUploads {} failed", self.url(prefix)),
            message,
            hint: String::new(),
        };
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut query = format!("uploads=&prefix={}", query_escape(prefix));
            if let Some((key, id)) = &markers {
                query.push_str(&format!(
                    "&key-marker={}&upload-id-marker={}",
                    query_escape(key),
                    query_escape(id)
                ));
            }
            let url = format!("{}/?{query}", self.bucket_endpoint);
            let (status, body) = self
                .signed_get(&url)
                .await
                .map_err(|e| map_error("ListMultipartUploads", &self.url(prefix), e))?;
            if status == 501 || status == 405 {
                return Ok(None);
            }
            let text = String::from_utf8_lossy(&body);
            if !(200..300).contains(&status) {
                return Err(map_error(
                    "ListMultipartUploads",
                    &self.url(prefix),
                    object_store::Error::Generic {
                        store: "S3",
                        source: format!("Server returned non-2xx status code: {status}: {text}")
                            .into(),
                    },
                ));
            }
            for upload in xml_elements(&text, "Upload") {
                match (xml_text(upload, "Key"), xml_text(upload, "UploadId")) {
                    (Some(k), Some(id)) if k.starts_with(prefix) => out.push((k, id)),
                    (Some(_), Some(_)) => {}
                    _ => return Err(fail(format!("unexpected answer: {text}"))),
                }
            }
            let truncated = xml_text(&text, "IsTruncated").is_some_and(|t| t == "true");
            match (
                truncated,
                xml_text(&text, "NextKeyMarker"),
                xml_text(&text, "NextUploadIdMarker"),
            ) {
                (true, Some(k), Some(id)) if markers.as_ref() != Some(&(k.clone(), id.clone())) => {
                    markers = Some((k, id));
                }
                _ => return Ok(Some(out)),
            }
        }
    }

    /// A GET signed like object_store's own requests, retried within the
    /// retry bound on 5xx, 429 and broken connections: (status, body).
    async fn signed_get(&self, url: &str) -> object_store::Result<(u16, Bytes)> {
        let r = &self.config.retry;
        let started = std::time::Instant::now();
        let mut backoff = r.initial_backoff;
        let mut attempt = 0;
        loop {
            let mut req = HttpRequest::new(HttpRequestBody::empty());
            *req.uri_mut() = url.parse().map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: format!("invalid request URL: {e}").into(),
            })?;
            if !self.skips_signature() {
                let credential = self.store.credentials().get_credential().await?;
                AwsAuthorizer::new(&credential, "s3", &self.config.region)
                    .try_authorize(&mut req, None)?;
            }
            let result = match self.http.execute(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match resp.into_body().bytes().await {
                        Ok(body) => Ok((status, body)),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            let retry = match &result {
                Ok((status, _)) => *status >= 500 && *status != 501 || *status == 429,
                Err(_) => true,
            };
            attempt += 1;
            if !retry || attempt > r.max_retries || started.elapsed() + backoff > r.total {
                return match result {
                    Ok(answer) => Ok(answer),
                    Err(e) => Err(object_store::Error::Generic {
                        store: "S3",
                        source: format!(
                            "Error performing GET {url}, after {} retries: {e}",
                            attempt - 1
                        )
                        .into(),
                    }),
                };
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(r.total / 4);
        }
    }

    /// True when requests go out unsigned (see [`Self::new`]).
    fn skips_signature(&self) -> bool {
        self.config.access_key_id.is_none()
            && self.config.endpoint.is_some()
            && self.config.role.source().is_none()
    }

    /// Aborts an upload, freeing its parts (an unknown upload succeeds).
    pub fn abort_multipart(&self, key: &str, upload: &str) -> Result<()> {
        self.run(self.abort_multipart_async(key, upload))
    }

    pub(crate) async fn abort_multipart_async(&self, key: &str, upload: &str) -> Result<()> {
        match self
            .store
            .abort_multipart(&ObjectPath::from(key), &upload.to_string())
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("AbortMultipartUpload", key, e)),
        }
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The contents of every `<name>...</name>` element of `xml`, in order.
fn xml_elements<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

/// The unescaped text of the first `<name>` element of `xml`.
fn xml_text(xml: &str, name: &str) -> Option<String> {
    xml_elements(xml, name).first().map(|t| {
        t.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&")
    })
}

fn info(m: &object_store::ObjectMeta) -> ObjectInfo {
    ObjectInfo {
        key: m.location.to_string(),
        size: m.size,
        e_tag: m.e_tag.clone(),
        modified_unix_ms: m.last_modified.timestamp_millis().max(0) as u64,
    }
}

/// True when `message` holds the HTTP status `code` as a number of its own
/// (not inside another number, such as a duration "350.844037ms").
fn has_status(message: &str, code: &str) -> bool {
    let bytes = message.as_bytes();
    message.match_indices(code).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + code.len()).copied();
        !before.is_some_and(|b| b.is_ascii_digit() || b == b'.')
            && !after.is_some_and(|b| b.is_ascii_digit() || b == b'.')
    })
}

/// Our error for a failed request, with a hint for the usual causes.
/// `message` with the `user:password@` of every URL in it replaced by
/// `***@` (an endpoint may carry credentials; errors name request URLs).
fn redact_userinfo(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

pub(crate) fn map_error(op: &str, url: &str, e: object_store::Error) -> Error {
    let message = redact_userinfo(&e.to_string());
    let low = message.to_ascii_lowercase();
    let hint = if matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || has_status(&low, "403")
        || has_status(&low, "401")
        || [
            "signaturedoesnotmatch",
            "invalidaccesskeyid",
            "accessdenied",
            "forbidden",
            "invalidtoken",
            "expiredtoken",
            "invalidclienttokenid",
        ]
        .iter()
        .any(|n| low.contains(n))
    {
        "; the server rejected the credentials or the request: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), the region and the bucket's policy"
    } else if low.contains("nosuchbucket") {
        "; the bucket does not exist: create it or fix the location"
    } else if low.contains("connect") || low.contains("connection") {
        "; the server could not be reached or dropped the connection: check AWS_ENDPOINT_URL / --s3-endpoint and that the server is up (requests were retried up to the retry bound, --s3-retry-timeout)"
    } else if low.contains("retries") || low.contains("timed out") || low.contains("timeout") {
        "; the server kept failing or did not answer within the retry bound (--s3-retry-timeout, --s3-max-retries): check the server and try again"
    } else {
        ""
    };
    Error::ObjectStore {
        context: format!("S3 {op} {url} failed"),
        message,
        hint: hint.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_found_only_as_numbers_of_their_own() {
        assert!(has_status(
            "server returned status code: 403 forbidden",
            "403"
        ));
        assert!(has_status("status 401", "401"));
        // A duration that happens to hold the digits is not a status.
        assert!(!has_status("error performing get in 350.844037ms", "403"));
        assert!(!has_status("request 14035 failed", "403"));
    }

    #[test]
    fn the_bucket_goes_into_the_host_of_a_virtual_hosted_custom_endpoint() {
        let cfg = |endpoint: Option<&str>, path_style: bool| S3Config {
            endpoint: endpoint.map(String::from),
            path_style,
            region: "eu-west-1".into(),
            ..S3Config::default()
        };
        assert_eq!(
            bucket_endpoint(&cfg(Some("https://minio.example.com:9000/"), false), "b"),
            "https://b.minio.example.com:9000"
        );
        assert_eq!(
            bucket_endpoint(&cfg(Some("https://minio.example.com/base"), false), "b"),
            "https://b.minio.example.com/base"
        );
        assert_eq!(
            bucket_endpoint(&cfg(Some("http://127.0.0.1:9000/"), true), "b"),
            "http://127.0.0.1:9000/b"
        );
        assert_eq!(
            bucket_endpoint(&cfg(None, false), "b"),
            "https://b.s3.eu-west-1.amazonaws.com"
        );
        // And object_store sends its requests there.
        let c = ObjectClient::new(&cfg(Some("https://minio.example.com"), false), "b").unwrap();
        assert_eq!(c.bucket_endpoint, "https://b.minio.example.com");
    }

    #[test]
    fn userinfo_in_error_messages_is_redacted() {
        assert_eq!(
            redact_userinfo("Error performing GET https://u:SECRET@h:9/b/k in 1s; see http://x/y"),
            "Error performing GET https://***@h:9/b/k in 1s; see http://x/y"
        );
        assert_eq!(redact_userinfo("no urls here"), "no urls here");
    }

    #[test]
    fn multipart_upload_listings_are_parsed() {
        let xml = "<ListMultipartUploadsResult><Bucket>b</Bucket><IsTruncated>false</IsTruncated><Upload><Key>p/shards/a&amp;b</Key><UploadId>id-1</UploadId></Upload><Upload><Key>p/x</Key><UploadId>id-2</UploadId></Upload></ListMultipartUploadsResult>";
        let ups: Vec<(Option<String>, Option<String>)> = xml_elements(xml, "Upload")
            .into_iter()
            .map(|u| (xml_text(u, "Key"), xml_text(u, "UploadId")))
            .collect();
        assert_eq!(
            ups,
            vec![
                (Some("p/shards/a&b".into()), Some("id-1".into())),
                (Some("p/x".into()), Some("id-2".into()))
            ]
        );
        assert_eq!(query_escape("p/shards/a b"), "p%2Fshards%2Fa%20b");
    }

    #[test]
    fn a_throttled_request_is_not_blamed_on_the_credentials() {
        let e = object_store::Error::Generic {
            store: "S3",
            source: "Error performing GET http://127.0.0.1:1/b/k in 350.844037ms, after 3 retries, max_retries: 3, retry_timeout: 2s - Server returned non-2xx status code: 503 Service Unavailable".into(),
        };
        let msg = map_error("GET", "s3://b/k", e).to_string();
        assert!(msg.contains("retry bound"), "{msg}");
        assert!(!msg.contains("credentials"), "{msg}");
        let e = object_store::Error::Generic {
            store: "S3",
            source: "Server returned non-2xx status code: 403 Forbidden".into(),
        };
        let msg = map_error("GET", "s3://b/k", e).to_string();
        assert!(msg.contains("credentials"), "{msg}");
    }
}
