//! Unit tests of the binary cache's HTTP details.

use super::*;

fn range(h: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let mut m = HeaderMap::new();
    m.insert(header::RANGE, HeaderValue::from_str(h).unwrap());
    parse_range(&m, size)
}

#[test]
fn ranges() {
    assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 10))));
    assert_eq!(range("bytes=90-", 100), Ok(Some((90, 100))));
    assert_eq!(range("bytes=-5", 100), Ok(Some((95, 100))));
    assert_eq!(range("bytes=-500", 100), Ok(Some((0, 100))));
    assert_eq!(range("bytes=50-500", 100), Ok(Some((50, 100))));
    assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
    assert_eq!(range("items=0-1", 100), Ok(None));
    assert!(range("bytes=100-", 100).is_err());
    assert!(range("bytes=5-2", 100).is_err());
    assert!(range("bytes=-0", 100).is_err());
    assert!(range("bytes=x-", 100).is_err());
    assert!(range("bytes=-", 100).is_err());
}

#[tokio::test]
async fn window_passes_only_its_bytes() {
    use tokio::io::AsyncWriteExt;
    let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    for (s, e) in [(0, 5000), (0, 1), (4999, 5000), (100, 4000), (1023, 1025)] {
        let mut w = Window {
            inner: Vec::new(),
            pos: 0,
            start: s,
            end: e,
        };
        for piece in data.chunks(333) {
            if w.write_all(piece).await.is_err() {
                break;
            }
        }
        assert_eq!(w.inner, &data[s as usize..e as usize], "{s}..{e}");
    }
}

#[test]
fn token_headers() {
    let mut m = HeaderMap::new();
    assert!(!carries_token(&m, "sekrit"));
    m.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer sekrit"),
    );
    assert!(carries_token(&m, "sekrit"));
    assert!(!carries_token(&m, "other"));
    let basic = format!("Basic {}", data_encoding::BASE64.encode(b"nix:sekrit"));
    m.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&basic).unwrap(),
    );
    assert!(carries_token(&m, "sekrit"));
    m.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!"));
    assert!(!carries_token(&m, "sekrit"));
}
