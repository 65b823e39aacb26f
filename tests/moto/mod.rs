//! A real S3-compatible server for tests: `moto_server` (PyPI `moto[server]`) on a free
//! loopback port, killed on drop, with plain HTTP access for what a test needs to do behind
//! the store's back (create buckets, damage objects).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `moto_server` on a free loopback port; killed on drop.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        Self::start_with_env(&[])
    }

    /// With `INITIAL_NO_AUTH_ACTION_COUNT=0` moto checks credentials like S3 does.
    pub fn start_with_env(env: &[(&str, &str)]) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server must be installed (pip install 'moto[server]')");
        let mut m = Moto {
            child: Some(child),
            port,
        };
        let started = Instant::now();
        let end = started + Duration::from_secs(60);
        loop {
            // Our server died (another process took the port between our probe and its bind,
            // and what answers there is not ours): start again on another port.
            if m.child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
            {
                m.child = None;
                return Self::start_with_env(env);
            }
            // With authentication on, an unsigned request is refused: any answer means up.
            // Answers count only once ours has had time to bind (or fail to).
            if matches!(m.http("GET", "/", &[]), Ok((code, _)) if code != 0)
                && started.elapsed() > Duration::from_millis(2500)
            {
                return m;
            }
            assert!(
                Instant::now() < end,
                "moto_server did not come up on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One plain HTTP/1.1 request (moto does not check signatures); returns status and body.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        self.request(method, path, body, "")
    }

    /// A request with credentials: moto refuses an anonymous GET of an object (403), and
    /// takes any credentials without checking the signature.
    #[allow(dead_code)]
    pub fn signed(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        self.request(
            method,
            path,
            body,
            "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\n",
        )
    }

    /// Writes an object over whatever is there, with a real signed PUT (a plain request's
    /// body would be dropped over an existing object).
    #[allow(dead_code)]
    pub fn put_object(&self, bucket: &str, key: &str, body: Vec<u8>) {
        use object_store::ObjectStoreExt;
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(format!("http://127.0.0.1:{}", self.port))
            .with_region("us-east-1")
            .with_allow_http(true)
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .expect("an S3 client for moto");
        // On a thread of its own: callers may be inside a runtime.
        std::thread::scope(|t| {
            t.spawn(|| {
                let rt = tokio::runtime::Runtime::new().expect("a runtime");
                rt.block_on(s3.put(&object_store::path::Path::from(key), body.into()))
                    .expect("PUT to moto");
            })
            .join()
            .expect("the PUT thread")
        });
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &str,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n",
            self.port,
            body.len()
        )?;
        s.write_all(body)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let text = String::from_utf8_lossy(&resp);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body_at = text.find("\r\n\r\n").map_or(resp.len(), |i| i + 4);
        Ok((status, resp[body_at..].to_vec()))
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = self
            .http("PUT", &format!("/{bucket}"), &[])
            .expect("PUT bucket");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    pub fn url(&self, bucket_and_prefix: &str) -> String {
        format!(
            "s3://{bucket_and_prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&allow_http=true&timeout=30s",
            self.port
        )
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// moto accepts any credentials, but the client needs some.
pub fn set_credentials() {
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::remove_var("AWS_SESSION_TOKEN");
    std::env::remove_var("AWS_PROFILE");
}
