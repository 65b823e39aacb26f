//! Unit tests of S3 URL parsing and key names.

use super::*;

#[test]
fn url_parsing() {
    let u = S3Url::parse(
        "s3://b/p/q/?endpoint=http://127.0.0.1:9000&region=eu&allow_http=true&timeout=5s",
    )
    .unwrap();
    assert_eq!(u.bucket, "b");
    assert_eq!(u.prefix, "p/q");
    assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert_eq!(u.region.as_deref(), Some("eu"));
    assert!(u.allow_http);
    assert_eq!(u.timeout, Duration::from_secs(5));
    assert_eq!(S3Url::parse("s3://b").unwrap().prefix, "");
    assert!(S3Url::parse("s3://").is_err());
    assert!(S3Url::parse("s3://b?bogus=1").is_err());
    assert!(S3Url::parse("s3://b?endpoint=http://x").is_err());
    assert!(S3Url::parse("s3://b?timeout=0s").is_err());
}

#[test]
fn decoding_names() {
    assert_eq!(percent_decode("a%20b"), "a b");
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("x%4"), "x%4");
}
