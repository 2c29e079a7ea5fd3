use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::*;

fn hdr(s: &str) -> Result<Directive, Invalid> {
    from_header(&HeaderValue::from_str(s).unwrap())
}

fn json(s: &str) -> Result<Directive, Invalid> {
    from_json(s.as_bytes())
}

#[test]
fn every_header_field() {
    let d = hdr("region=AMS;state=captured_write;elsewhere=true;timeout=800ms;fallback=prefer_self").unwrap();
    assert_eq!(d.region, ["ams"]);
    assert_eq!(d.state.as_deref(), Some("captured_write"));
    assert!(d.elsewhere);
    assert_eq!(d.timeout, Some(Duration::from_millis(800)));
    assert_eq!(d.fallback, Some(Fallback::PreferSelf));
    assert_eq!(d.transform, Transform::default());
    assert_eq!(d.cache, None);

    let d = hdr("instance=00ab12;app=other-app;fallback=force_self;timeout=5s").unwrap();
    assert_eq!(d.instance.as_deref(), Some("00ab12"));
    assert_eq!(d.app.as_deref(), Some("other-app"));
    assert_eq!(d.fallback, Some(Fallback::ForceSelf));
    assert_eq!(d.timeout, Some(Duration::from_secs(5)));
    assert!(!d.elsewhere);

    let d = hdr("prefer_instance=m-1;timeout=1m").unwrap();
    assert_eq!(d.prefer_instance.as_deref(), Some("m-1"));
    assert_eq!(d.timeout, Some(Duration::from_secs(60)));

    assert_eq!(hdr("app=billing").unwrap().app.as_deref(), Some("billing"));
    assert!(hdr("elsewhere=true").unwrap().elsewhere);
    assert!(hdr("region=ams;elsewhere=false").is_ok());
}

#[test]
fn header_syntax_quotes_spaces_and_case() {
    let d = hdr(r#"region="ams,FRA, iad" ; Instance = m-1 ;"#).unwrap();
    assert_eq!(d.region, ["ams", "fra", "iad"]);
    assert_eq!(d.instance.as_deref(), Some("m-1"));
    // A quoted value keeps its ';' out of the split (and is then judged as a value).
    assert_eq!(
        hdr(r#"region="ams;fra""#).unwrap_err(),
        Invalid::bad("region", "ams;fra", "is not a region code")
    );
    assert!(hdr(r#"region=ams;state="a\"b""#).unwrap_err().to_string().contains("state \"a\\\"b\""));
    assert_eq!(hdr("region=ams,ams,us").unwrap().region, ["ams", "us"], "repeats dropped, aliases kept");
    assert_eq!(hdr(r#"region="ams"#).unwrap_err(), Invalid::Malformed("region=\"ams".into()));
    assert_eq!(hdr("region=ams;elsewhere").unwrap_err(), Invalid::Malformed("elsewhere".into()));
}

#[test]
fn refused_directives_name_their_field() {
    let cases: &[(&str, &str)] = &[
        ("", "nothing to do"),
        (";", "nothing to do"),
        ("state=x", "nothing to do"),
        ("timeout=1s;fallback=force_self", "nothing to do"),
        ("elsewhere=false", "nothing to do"),
        ("regoin=ams", "unknown field \"regoin\""),
        ("region=ams;region=fra", "region is given twice"),
        ("instance=a;instance=b", "instance is given twice"),
        ("region=", "region is empty"),
        ("region=ams,,fra", "region is empty"),
        ("region=\"\"", "region is empty"),
        ("instance=", "instance is empty"),
        ("prefer_instance=", "prefer_instance is empty"),
        ("app=", "app is empty"),
        ("region=ams;state=", "state is empty"),
        ("region=ams;fallback=", "fallback is empty"),
        ("region=ams;timeout=", "timeout is empty"),
        ("region=a_b", "region \"a_b\" is not a region code"),
        ("instance=a/b", "instance \"a/b\" is not a machine id"),
        ("app=Billing", "app \"Billing\" is not an app name"),
        ("region=ams;elsewhere=yes", "elsewhere \"yes\" is not true or false"),
        ("region=ams;timeout=soon", "timeout \"soon\" is not a duration"),
        ("region=ams;timeout=0s", "timeout \"0s\" must be above zero"),
        ("region=ams;fallback=self", "fallback \"self\" is not force_self or prefer_self"),
        ("instance=a;prefer_instance=b", "instance and prefer_instance cannot be combined"),
        ("instance=a;elsewhere=true", "instance and elsewhere cannot be combined"),
        ("region=ams;state=a b", "state \"a b\" has a space"),
        ("region=ams;state=\"a;b\"", "state \"a;b\" has a space, ';'"),
    ];
    for (value, message) in cases {
        let e = hdr(value).unwrap_err();
        assert!(e.to_string().starts_with("fly-replay: "), "{value}: {e}");
        assert!(e.to_string().contains(message), "{value}: {e}");
    }
    let long = format!("region=ams;state={}", "x".repeat(1025));
    assert!(hdr(&long).unwrap_err().to_string().contains("longer than 1024"));
    assert!(hdr(&format!("region=ams;state={}", "x".repeat(1024))).is_ok());
    // Cut for the message at a character, not a byte.
    let e = json(&format!(r#"{{"region": "ams", "state": "{}"}}"#, "é".repeat(600))).unwrap_err();
    assert!(e.to_string().contains("longer than 1024"), "{e}");
    let not_ascii = HeaderValue::from_bytes(b"region=ams;state=caf\xc3\xa9").unwrap();
    assert_eq!(from_header(&not_ascii).unwrap_err(), Invalid::NotAscii);
}

#[test]
fn json_form_with_transform_and_cache() {
    let d = json(
        r#"{"region": "ams,FRA", "prefer_instance": "m-2", "state": "k=v", "elsewhere": true,
            "timeout": "800ms", "fallback": "prefer_self",
            "transform": {"path": "/v2/items?x=1", "delete_headers": ["Cookie", "x-debug"],
                          "set_headers": [{"name": "X-User", "value": "42"}]},
            "cache": {"prefix": "example.com/api/*", "ttl": 60, "allow_bypass": true}}"#,
    )
    .unwrap();
    assert_eq!(d.region, ["ams", "fra"]);
    assert_eq!(d.prefer_instance.as_deref(), Some("m-2"));
    assert_eq!(d.state.as_deref(), Some("k=v"));
    assert!(d.elsewhere);
    assert_eq!(d.timeout, Some(Duration::from_millis(800)));
    assert_eq!(d.fallback, Some(Fallback::PreferSelf));
    assert_eq!(d.transform.path.as_ref().map(|p| p.as_str()), Some("/v2/items?x=1"));
    assert_eq!(
        d.transform.delete_headers,
        [HeaderName::from_static("cookie"), HeaderName::from_static("x-debug")]
    );
    assert_eq!(
        d.transform.set_headers,
        [(HeaderName::from_static("x-user"), HeaderValue::from_static("42"))]
    );
    let c = d.cache.unwrap();
    assert_eq!(
        c,
        CacheDirective {
            prefix: "/api".into(),
            ttl: Duration::from_secs(60),
            invalidate: false,
            allow_bypass: true
        }
    );
    assert!(c.covers("/api") && c.covers("/api/x") && !c.covers("/apiary") && !c.covers("/"));

    let d = json(r#"{"region": ["ams", "eu"], "app": "other", "timeout": 2}"#).unwrap();
    assert_eq!(d.region, ["ams", "eu"]);
    assert_eq!(d.timeout, Some(Duration::from_secs(2)));
    let d = json(r#"{"instance": "m-1", "cache": {"invalidate": true}}"#).unwrap();
    assert_eq!(
        d.cache.unwrap(),
        CacheDirective { prefix: String::new(), ttl: Duration::ZERO, invalidate: true, allow_bypass: false }
    );
}

#[test]
fn json_form_refusals() {
    let cases: &[(&str, &str)] = &[
        ("not json", "JSON body"),
        (r#"{"regoin": "ams"}"#, "unknown field `regoin`"),
        (r#"{"region": "ams", "elsewhere": "true"}"#, "JSON body"),
        (r#"{"state": "x"}"#, "nothing to do"),
        (r#"{"instance": "a", "prefer_instance": "b"}"#, "instance and prefer_instance"),
        (r#"{"instance": "a", "elsewhere": true}"#, "instance and elsewhere"),
        (r#"{"region": "ams", "state": "a b"}"#, "state \"a b\" has a space"),
        (r#"{"region": "ams", "state": "{\"a\":1}"}"#, "state"),
        (r#"{"region": "ams", "timeout": 0}"#, "must be above zero"),
        (r#"{"region": "ams", "transform": {"path": "v2"}}"#, "transform.path \"v2\""),
        (r#"{"region": "ams", "transform": {"path": "/a b"}}"#, "transform.path"),
        (r#"{"region": "ams", "transform": {"paht": "/"}}"#, "unknown field `paht`"),
        (
            r#"{"region": "ams", "transform": {"delete_headers": ["a b"]}}"#,
            "transform.delete_headers \"a b\"",
        ),
        (r#"{"region": "ams", "transform": {"delete_headers": ["Content-Length"]}}"#, "frames the request"),
        (
            r#"{"region": "ams", "transform": {"set_headers": [{"name": "fly-replay-src", "value": "x"}]}}"#,
            "set by tern",
        ),
        (r#"{"region": "ams", "transform": {"set_headers": [{"name": "Host", "value": "x"}]}}"#, "frames"),
        (
            r#"{"region": "ams", "transform": {"set_headers": [{"name": "x", "value": "a\nb"}]}}"#,
            "header value",
        ),
        (r#"{"region": "ams", "cache": {"ttl": 60}}"#, "cache.prefix is empty"),
        (r#"{"region": "ams", "cache": {"prefix": "/a/*"}}"#, "cache.ttl is empty"),
        (r#"{"region": "ams", "cache": {"prefix": "/a/*", "ttl": 9}}"#, "at least 10"),
        (r#"{"region": "ams", "cache": {"prefix": "a", "ttl": 10}}"#, "not a path"),
        (r#"{"region": "ams", "cache": {"prefix": "h:80/a", "ttl": 10}}"#, "not a hostname"),
        (r#"{"region": "ams", "cache": {"prefix": "/a*/b", "ttl": 10}}"#, "'*' at the end"),
    ];
    for (body, message) in cases {
        let e = json(body).unwrap_err();
        assert!(e.to_string().contains(message), "{body}: {e}");
    }
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn cache_headers() {
    assert_eq!(cache_from_headers(&headers(&[("fly-replay-cache-ttl-secs", "60")]), "/a").unwrap(), None);
    let h = headers(&[("fly-replay-cache", "example.com/api/*"), ("fly-replay-cache-ttl-secs", "60")]);
    let c = cache_from_headers(&h, "/api/users/7").unwrap().unwrap();
    assert_eq!(
        c,
        CacheDirective {
            prefix: "/api".into(),
            ttl: Duration::from_secs(60),
            invalidate: false,
            allow_bypass: false
        }
    );
    // The prefix must cover the request that set it.
    assert_eq!(
        cache_from_headers(&h, "/other").unwrap_err(),
        Invalid::CacheNotThisPath { prefix: "/api".into(), path: "/other".into() }
    );
    assert!(cache_from_headers(&h, "/apiary").is_err());

    let h = headers(&[
        ("fly-replay-cache", "/*"),
        ("fly-replay-cache-ttl-secs", "10"),
        ("fly-replay-cache-allow-bypass", "yes"),
    ]);
    let c = cache_from_headers(&h, "/anything").unwrap().unwrap();
    assert_eq!((c.prefix.as_str(), c.allow_bypass), ("/", true));
    let h = headers(&[("fly-replay-cache", "/users/"), ("fly-replay-cache-ttl-secs", "10")]);
    assert_eq!(cache_from_headers(&h, "/users").unwrap().unwrap().prefix, "/users");

    let c = cache_from_headers(&headers(&[("fly-replay-cache", "invalidate")]), "/x").unwrap().unwrap();
    assert!(c.invalidate && c.prefix.is_empty() && c.ttl.is_zero());

    let refused: &[(&[(&'static str, &str)], &str)] = &[
        (&[("fly-replay-cache", "/a/*")], "fly-replay-cache-ttl-secs is empty"),
        (&[("fly-replay-cache", "/a/*"), ("fly-replay-cache-ttl-secs", "9")], "at least 10"),
        (&[("fly-replay-cache", "/a/*"), ("fly-replay-cache-ttl-secs", "1m")], "not a number of seconds"),
        (&[("fly-replay-cache", "a_b/*"), ("fly-replay-cache-ttl-secs", "10")], "not a hostname"),
        (&[("fly-replay-cache", "*"), ("fly-replay-cache-ttl-secs", "10")], "not a path"),
        (&[("fly-replay-cache", "h.test:8080/a"), ("fly-replay-cache-ttl-secs", "10")], "not a hostname"),
        (
            &[("fly-replay-cache", "/a"), ("fly-replay-cache", "/b"), ("fly-replay-cache-ttl-secs", "10")],
            "twice",
        ),
        (
            &[
                ("fly-replay-cache", "/a"),
                ("fly-replay-cache-ttl-secs", "10"),
                ("fly-replay-cache-allow-bypass", "maybe"),
            ],
            "not yes or no",
        ),
    ];
    for (pairs, message) in refused {
        let e = cache_from_headers(&headers(pairs), "/a/b").unwrap_err();
        assert!(e.to_string().contains(message), "{pairs:?}: {e}");
    }
}

#[test]
fn replay_src_and_failed_headers() {
    assert_eq!(
        src_header("m-1", "ams", 1_700_000_000_000_000, None),
        "instance=m-1;region=ams;t=1700000000000000"
    );
    assert_eq!(src_header("m-1", "ams", 5, Some("k=v")), "instance=m-1;region=ams;t=5;state=k=v");
    // A state the parser accepted comes back exactly as the app wrote it.
    let d = hdr(r#"region=ams;state="tok-123_ABC.~""#).unwrap();
    assert_eq!(
        src_header("m", "ams", 1, d.state.as_deref()),
        "instance=m;region=ams;t=1;state=tok-123_ABC.~"
    );
    // A caller's mistake cannot break the header.
    assert_eq!(src_header("a;b", "x y", 1, None), "instance=a_b;region=x_y;t=1");

    let f = Failed {
        instance: "m-2",
        app: "target",
        region: "fra",
        replay_source: "m-1",
        reason: "timeout",
        elapsed_ms: 812,
    };
    assert_eq!(
        failed_header(&f),
        "instance=m-2;app=target;region=fra;replay_source=m-1;reason=timeout;elapsed_ms=812"
    );
}

#[test]
fn regions_and_groups() {
    let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(region_matches(&want(&["ams"]), "ams"));
    assert!(!region_matches(&want(&["ams"]), "fra"));
    assert!(region_matches(&want(&["any"]), "syd"));
    assert!(region_matches(&want(&["iad", "eu"]), "fra"));
    assert!(region_matches(&want(&["us"]), "iad") && !region_matches(&want(&["us"]), "yyz"));
    assert!(region_matches(&want(&["usa"]), "ord"));
    assert!(region_matches(&want(&["na"]), "yyz") && region_matches(&want(&["na"]), "yul"));
    assert!(region_matches(&want(&["sa"]), "gru") && region_matches(&want(&["apac"]), "nrt"));
    assert!(!region_matches(&want(&["eu"]), "iad"));
    assert!(!region_matches(&[], "ams"));
    assert_eq!(region_group("ams"), None);
    assert_eq!(region_group("any"), None);
    for g in ["us", "usa", "na", "eu", "sa", "apac"] {
        let regions = region_group(g).unwrap();
        assert!(
            regions.iter().all(|r| crate::model::names::check_region(r).is_ok() && region_group(r).is_none())
        );
    }
}
