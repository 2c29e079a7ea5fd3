use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::*;

fn to(instance: &str) -> Target {
    Target { app: None, instance: Some(instance.into()), region: vec![], prefer_instance: None }
}

fn cached(prefix: &str, ttl_secs: u64, allow_bypass: bool) -> CacheDirective {
    CacheDirective {
        prefix: prefix.into(),
        ttl: Duration::from_secs(ttl_secs),
        invalidate: false,
        allow_bypass,
    }
}

#[tokio::test(start_paused = true)]
async fn path_entries_expire_with_their_ttl() {
    let c = ReplayCache::default();
    c.put_path("app", "a.test", &cached("/api", 10, false), to("m-1"));
    assert_eq!(c.path("app", "a.test", "/api/x"), Some((to("m-1"), false)));
    tokio::time::advance(Duration::from_millis(9_999)).await;
    assert!(c.path("app", "a.test", "/api").is_some());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(c.path("app", "a.test", "/api"), None);
    assert_eq!(c.len(), 0, "an expired entry goes when a lookup finds it");
}

#[tokio::test(start_paused = true)]
async fn the_longest_path_prefix_wins_on_its_host_only() {
    let c = ReplayCache::default();
    c.put_path("app", "a.test", &cached("/", 60, false), to("root"));
    c.put_path("app", "a.test", &cached("/api", 60, true), to("api"));
    c.put_path("app", "a.test", &cached("/api/v2", 60, false), to("v2"));
    assert_eq!(c.path("app", "a.test", "/api/v2/items").map(|t| t.0), Some(to("v2")));
    assert_eq!(c.path("app", "a.test", "/api/v2").map(|t| t.0), Some(to("v2")));
    assert_eq!(c.path("app", "a.test", "/api/v1/items"), Some((to("api"), true)));
    assert_eq!(c.path("app", "a.test", "/api/").map(|t| t.0), Some(to("api")));
    assert_eq!(c.path("app", "a.test", "/apiary").map(|t| t.0), Some(to("root")), "not under /api");
    assert_eq!(c.path("app", "a.test", "/").map(|t| t.0), Some(to("root")));
    assert_eq!(c.path("app", "b.test", "/api"), None, "per hostname");
    assert_eq!(c.path("other", "a.test", "/api"), None, "per app");

    // A shorter prefix still serves once the longer one expires.
    c.put_path("app", "a.test", &cached("/api/v2", 10, false), to("v2"));
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(c.path("app", "a.test", "/api/v2/items").map(|t| t.0), Some(to("api")));
    assert_eq!(c.len(), 2);

    // Replacing an entry does not count twice.
    c.put_path("app", "a.test", &cached("/api", 60, false), to("api-2"));
    assert_eq!(c.len(), 2);
    assert_eq!(c.path("app", "a.test", "/api/x").map(|t| t.0), Some(to("api-2")));
}

#[tokio::test(start_paused = true)]
async fn invalidation_drops_exactly_what_it_names() {
    let c = ReplayCache::default();
    c.put_path("app", "a.test", &cached("/", 60, false), to("root"));
    c.put_path("app", "a.test", &cached("/api", 60, false), to("api"));
    c.invalidate_path("app", "a.test", "/api");
    assert_eq!(c.path("app", "a.test", "/api/x").map(|t| t.0), Some(to("root")));
    c.invalidate_path("app", "a.test", "/nothing");
    c.invalidate_path("app", "b.test", "/");
    c.invalidate_path("ghost", "a.test", "/");
    assert_eq!(c.len(), 1);
    // An invalidation directive stores nothing.
    let inv =
        CacheDirective { prefix: String::new(), ttl: Duration::ZERO, invalidate: true, allow_bypass: false };
    c.put_path("app", "a.test", &inv, to("x"));
    assert_eq!(c.len(), 1);

    c.put_session("app", 0, "s1", Duration::from_secs(60), to("m-1"));
    c.put_session("app", 1, "s1", Duration::from_secs(60), to("m-2"));
    c.invalidate_session("app", 0, "s1");
    assert_eq!(c.session("app", 0, "s1"), None);
    assert_eq!(c.session("app", 1, "s1"), Some(to("m-2")));
    assert_eq!(c.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn sessions_are_per_app_rule_and_value_and_expire() {
    let c = ReplayCache::default();
    c.put_session("app", 0, "alice", Duration::from_secs(10), to("m-1"));
    c.put_session("app", 0, "bob", Duration::from_secs(30), to("m-2"));
    assert_eq!(c.session("app", 0, "alice"), Some(to("m-1")));
    assert_eq!(c.session("app", 1, "alice"), None);
    assert_eq!(c.session("other", 0, "alice"), None);
    c.put_session("app", 0, "alice", Duration::from_secs(10), to("m-3"));
    assert_eq!((c.session("app", 0, "alice"), c.len()), (Some(to("m-3")), 2));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(c.session("app", 0, "alice"), None);
    assert_eq!(c.session("app", 0, "bob"), Some(to("m-2")));
    assert_eq!(c.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn forgetting_an_app_drops_all_of_it() {
    let c = ReplayCache::default();
    c.put_path("app", "a.test", &cached("/", 60, false), to("m-1"));
    c.put_session("app", 0, "v", Duration::from_secs(60), to("m-1"));
    c.put_session("keep", 0, "v", Duration::from_secs(60), to("k-1"));
    c.forget_app("app");
    assert_eq!(c.len(), 1);
    assert_eq!(c.path("app", "a.test", "/"), None);
    assert_eq!(c.session("app", 0, "v"), None);
    assert_eq!(c.session("keep", 0, "v"), Some(to("k-1")));
}

#[tokio::test(start_paused = true)]
async fn the_cache_is_bounded() {
    let c = ReplayCache::with_capacity(64);
    // Full of live entries: the eighth closest to expiry makes room.
    for i in 0..64u64 {
        c.put_session("app", 0, &format!("v{i}"), Duration::from_secs(100 + i), to("m"));
    }
    assert_eq!(c.len(), 64);
    c.put_session("app", 0, "new", Duration::from_secs(100), to("m"));
    assert!(c.len() <= 64 && c.len() >= 56, "{}", c.len());
    assert_eq!(c.session("app", 0, "new"), Some(to("m")));
    assert_eq!(c.session("app", 0, "v0"), None, "the soonest to expire went");
    assert_eq!(c.session("app", 0, "v63"), Some(to("m")));
    for i in 0..1000 {
        c.put_path("app", "a.test", &cached(&format!("/p{i}"), 60, false), to("m"));
        assert!(c.len() <= 64);
    }
    // Expired entries go first when it is full.
    for i in 0..64 {
        if c.len() == 64 {
            break;
        }
        c.put_path("app", "b.test", &cached(&format!("/q{i}"), 60, false), to("m"));
    }
    assert_eq!(c.len(), 64);
    tokio::time::advance(Duration::from_secs(1000)).await;
    c.put_session("app", 0, "late", Duration::from_secs(10), to("m"));
    assert_eq!(c.len(), 1);
    // The default bound.
    assert_eq!(CAPACITY, 65_536);
}

#[test]
fn path_prefixes_longest_first() {
    let all = |p| prefixes(p).collect::<Vec<_>>();
    assert_eq!(all("/a/b/c"), ["/a/b/c", "/a/b", "/a", "/"]);
    assert_eq!(all("/a/b/"), ["/a/b", "/a", "/"]);
    assert_eq!(all("/"), ["/"]);
    assert_eq!(all(""), ["/"]);
    assert_eq!(all("//a"), ["//a", "/", "/"]);
}

fn spec(rules: &str) -> AppSpec {
    toml::from_str(&format!("name = \"app\"\n{rules}")).unwrap()
}

fn request(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, HeaderValue::from_str(v).unwrap());
    }
    h
}

const RULES: &str = r#"
[[replay_cache]]
path_prefix = "/"
type = "cookie"
name = "session"
ttl_seconds = 60
[[replay_cache]]
path_prefix = "/api"
type = "header"
name = "X-Tenant"
ttl_seconds = 60
[[replay_cache]]
path_prefix = "b.test/api"
type = "cookie"
name = "b_session"
ttl_seconds = 60
[[replay_cache]]
path_prefix = "B.test/"
type = "cookie"
name = "b_root"
ttl_seconds = 60
"#;

#[test]
fn session_rule_takes_the_longest_prefix_and_its_value() {
    let s = spec(RULES);
    let h = request(&[
        ("cookie", "a=1; session=abc"),
        ("x-tenant", "t-9"),
        ("cookie", "b_session=\"q\"; b_root=r"),
    ]);
    assert_eq!(session_rule(&s, "a.test", "/", &h), Some((0, "abc".into())));
    assert_eq!(session_rule(&s, "a.test", "/web/page", &h), Some((0, "abc".into())));
    assert_eq!(session_rule(&s, "a.test", "/api/items", &h), Some((1, "t-9".into())));
    // A host-scoped rule covers its host only, and beats a host-less one of equal length.
    assert_eq!(session_rule(&s, "b.test", "/api/items", &h), Some((2, "q".into())));
    assert_eq!(session_rule(&s, "b.test", "/web", &h), Some((3, "r".into())));
    // The covering rule decides; a value for another rule does not stand in.
    let no_tenant = request(&[("cookie", "session=abc")]);
    assert_eq!(session_rule(&s, "a.test", "/api", &no_tenant), None);
    assert_eq!(session_rule(&s, "a.test", "/", &HeaderMap::new()), None);
    assert_eq!(session_rule(&spec(""), "a.test", "/", &h), None);
}

#[test]
fn session_cookies_are_parsed_as_browsers_send_them() {
    let s = spec(RULES);
    let value = |pairs: &[(&'static str, &str)]| {
        session_rule(&s, "a.test", "/", &request(pairs)).map(|(_, v)| v.into_owned())
    };
    assert_eq!(value(&[("cookie", "session=abc")]).as_deref(), Some("abc"));
    assert_eq!(value(&[("cookie", "a=1; b=2"), ("cookie", "session=two")]).as_deref(), Some("two"));
    assert_eq!(value(&[("cookie", "a=1;session=x;b=2")]).as_deref(), Some("x"));
    assert_eq!(value(&[("cookie", "session=; session=later")]).as_deref(), Some("later"));
    assert_eq!(value(&[("cookie", "session=\"quoted\"")]).as_deref(), Some("quoted"));
    assert_eq!(value(&[("cookie", "xsession=no; Session=no; session_x=no")]), None);
    assert_eq!(value(&[("cookie", "session")]), None);
    assert_eq!(value(&[("cookie", "v=a=b; session=a=b")]).as_deref(), Some("a=b"));
}

/// The count stays exact while threads insert, look up, invalidate and forget at once,
/// so the bound neither leaks nor locks out inserts over time.
#[test]
fn the_count_survives_concurrent_use() {
    let c = std::sync::Arc::new(ReplayCache::with_capacity(512));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let c = std::sync::Arc::clone(&c);
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let app = ["a", "b", "c"][i % 3];
                    c.put_session(app, t, &format!("v{}", i % 50), Duration::from_secs(60), to("m"));
                    c.put_path(app, "h.test", &cached(&format!("/p{}", i % 40), 60, false), to("m"));
                    c.path(app, "h.test", "/p1/x");
                    if i % 7 == 0 {
                        c.invalidate_session(app, t, &format!("v{}", i % 50));
                    }
                    if i % 97 == 0 {
                        c.forget_app(app);
                    }
                    assert!(c.len() <= 512 + 16, "{}", c.len());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for app in ["a", "b", "c"] {
        c.forget_app(app);
    }
    assert_eq!(c.len(), 0);
}
