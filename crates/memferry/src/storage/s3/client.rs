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
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};

use super::config::S3Config;
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
            b = b.with_endpoint(e.trim_end_matches('/'));
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
            // A custom endpoint without credentials: anonymous requests
            // (public buckets, test servers). On AWS the default credential
            // chain (web identity, container, instance metadata) applies.
            _ if config.endpoint.is_some() => b = b.with_skip_signature(true),
            _ => {}
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
pub(crate) fn map_error(op: &str, url: &str, e: object_store::Error) -> Error {
    let message = e.to_string();
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
