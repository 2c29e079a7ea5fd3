use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A v2 header: command (0 LOCAL, 1 PROXY), family and transport byte, the address block,
/// then `tlvs`.
fn v2(command: u8, fam: u8, addrs: &[u8], tlvs: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x20 | command);
    h.push(fam);
    let len = u16::try_from(addrs.len() + tlvs.len()).unwrap();
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(addrs);
    h.extend_from_slice(tlvs);
    h
}

fn inet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut a = src.to_vec();
    a.extend_from_slice(&dst);
    a.extend_from_slice(&sport.to_be_bytes());
    a.extend_from_slice(&dport.to_be_bytes());
    a
}

/// Every proper prefix of a complete header asks for more bytes, and the whole of it
/// parses to `want`, also with a client's bytes after it.
fn parses_whole_and_waits_on_parts(header: &[u8], want: Header) {
    for cut in 0..header.len() {
        assert_eq!(parse(&header[..cut]), Ok(None), "{cut} of {} bytes: {:?}", header.len(), &header[..cut]);
    }
    assert_eq!(parse(header), Ok(Some((want, header.len()))));
    let mut more = header.to_vec();
    more.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert_eq!(parse(&more), Ok(Some((want, header.len()))));
}

#[test]
fn version_1_tcp4_tcp6_and_unknown() {
    parses_whole_and_waits_on_parts(
        b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 443\r\n",
        Header::Proxied { source: addr("192.0.2.1:51234"), destination: addr("198.51.100.7:443") },
    );
    parses_whole_and_waits_on_parts(
        b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n",
        Header::Proxied { source: addr("[2001:db8::1]:65535"), destination: addr("[2001:db8::2]:0") },
    );
    parses_whole_and_waits_on_parts(b"PROXY UNKNOWN\r\n", Header::Local);
    parses_whole_and_waits_on_parts(b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n", Header::Local);
}

#[test]
fn version_1_refuses_what_breaks_the_format() {
    for bad in [
        &b"PROXY TCP4 192.0.2.1 198.51.100.7 51234\r\n"[..],
        b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 443 9\r\n",
        b"PROXY TCP4 192.0.2.1  198.51.100.7 51234 443\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.7 51234 443\r\n",
        b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 65536 443\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 +80 443\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 080 443\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 80 -1\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 80 443\rX",
        b"PROXY UDP4 192.0.2.1 198.51.100.7 80 443\r\n",
        b"PROXY tcp4 192.0.2.1 198.51.100.7 80 443\r\n",
        b"PROXY \r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.\xff 80 443\r\n",
    ] {
        assert_eq!(parse(bad), Err(Refused::Malformed), "{}", String::from_utf8_lossy(bad));
    }
    // A CR as the 107th byte: the LF would make the header 108 bytes.
    let mut at_106 = b"PROXY UNKNOWN ".to_vec();
    at_106.resize(106, b'x');
    at_106.extend_from_slice(b"\r\n");
    assert_eq!(parse(&at_106), Err(Refused::Malformed));
    assert_eq!(parse(&at_106[..107]), Err(Refused::Malformed), "known without waiting for the LF");
    let mut at_105 = b"PROXY UNKNOWN ".to_vec();
    at_105.resize(105, b'x');
    at_105.extend_from_slice(b"\r\n");
    assert_eq!(parse(&at_105), Ok(Some((Header::Local, V1_MAX))), "the longest header parses");
    // No CRLF within the longest header the format allows.
    let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 120]].concat();
    assert_eq!(parse(&long), Err(Refused::Malformed));
    assert_eq!(parse(&long[..V1_MAX - 1]), Ok(None));
}

#[test]
fn version_2_ipv4_ipv6_local_and_tlvs() {
    parses_whole_and_waits_on_parts(
        &v2(1, 0x11, &inet([192, 0, 2, 1], [198, 51, 100, 7], 51234, 443), &[]),
        Header::Proxied { source: addr("192.0.2.1:51234"), destination: addr("198.51.100.7:443") },
    );
    let mut six = Vec::new();
    six.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
    six.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
    six.extend_from_slice(&[0x1f, 0x90, 0x01, 0xbb]);
    parses_whole_and_waits_on_parts(
        &v2(1, 0x21, &six, &[]),
        Header::Proxied { source: addr("[2001:db8::1]:8080"), destination: addr("[2001:db8::2]:443") },
    );
    // TLVs (an ALPN and an empty NOOP) after the addresses are skipped.
    let tlvs = [0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00];
    parses_whole_and_waits_on_parts(
        &v2(1, 0x11, &inet([10, 0, 0, 1], [10, 0, 0, 2], 1, 2), &tlvs),
        Header::Proxied { source: addr("10.0.0.1:1"), destination: addr("10.0.0.2:2") },
    );
    // LOCAL: the balancer's own connection, whatever follows (its block is discarded unread,
    // even a family tern does not know or a block too short for its family).
    parses_whole_and_waits_on_parts(&v2(0, 0x41, &[1, 2, 3], &[]), Header::Local);
    parses_whole_and_waits_on_parts(&v2(0, 0x21, &[0u8; 4], &[]), Header::Local);
    parses_whole_and_waits_on_parts(
        &v2(0, 0x11, &inet([1, 1, 1, 1], [2, 2, 2, 2], 1, 2), &[]),
        Header::Local,
    );
    parses_whole_and_waits_on_parts(&v2(0, 0x00, &[], &[]), Header::Local);
    // PROXY over UNSPEC, UDP or a UNIX socket: nothing tern can use as a client address.
    parses_whole_and_waits_on_parts(&v2(1, 0x00, &[], &[]), Header::Local);
    parses_whole_and_waits_on_parts(
        &v2(1, 0x12, &inet([1, 1, 1, 1], [2, 2, 2, 2], 1, 2), &[]),
        Header::Local,
    );
    parses_whole_and_waits_on_parts(&v2(1, 0x31, &[0u8; 216], &[]), Header::Local);
}

#[test]
fn version_2_refuses_what_breaks_the_format() {
    let good = v2(1, 0x11, &inet([10, 0, 0, 1], [10, 0, 0, 2], 1, 2), &[]);
    let with = |at: usize, byte: u8| {
        let mut h = good.clone();
        h[at] = byte;
        h
    };
    assert_eq!(parse(&with(12, 0x11)), Err(Refused::Malformed), "version 1 in a v2 header");
    assert_eq!(parse(&with(12, 0x22)), Err(Refused::Malformed), "command 2");
    assert_eq!(parse(&with(13, 0x41)), Err(Refused::Malformed), "family 4");
    assert_eq!(parse(&with(13, 0x13)), Err(Refused::Malformed), "transport 3");
    // Shorter than the family's address block.
    assert_eq!(parse(&v2(1, 0x11, &[0u8; 11], &[])), Err(Refused::Malformed));
    assert_eq!(parse(&v2(1, 0x21, &[0u8; 12], &[])), Err(Refused::Malformed));
    // A TLV running past the header's end, and a stray byte after the last TLV.
    let addrs = inet([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
    assert_eq!(parse(&v2(1, 0x11, &addrs, &[0x01, 0x00, 0x05, b'h'])), Err(Refused::Malformed));
    assert_eq!(parse(&v2(1, 0x11, &addrs, &[0x04, 0x00, 0x00, 0x01])), Err(Refused::Malformed));
    // Longer than tern reads.
    let mut long = good.clone();
    long[14..16].copy_from_slice(&u16::try_from(V2_MAX).unwrap().to_be_bytes());
    assert_eq!(parse(&long), Err(Refused::Malformed));
}

#[test]
fn anything_else_first_is_a_missing_header() {
    for other in [&b"GET / HTTP/1.1\r\n"[..], b"\x16\x03\x01\x02\x00", b"PROXX", b"\r\n\r\nX", b"P\r"] {
        assert_eq!(parse(other), Err(Refused::Missing), "{other:?}");
    }
}

#[tokio::test]
async fn reading_keeps_the_clients_bytes_after_the_header() {
    let header = b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 443\r\n";
    let (mut client, mut server) = tokio::io::duplex(64);
    let sent = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        // In pieces, as a slow network delivers them.
        for piece in [&header[..9], &header[9..], b"GET / HTTP/1.1\r\n"] {
            client.write_all(piece).await.unwrap();
        }
        client
    });
    let (got, rest) = read(&mut server, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        got,
        Header::Proxied { source: addr("192.0.2.1:51234"), destination: addr("198.51.100.7:443") }
    );
    let _client = sent.await.unwrap();
    let mut after = rest.to_vec();
    while after.len() < 16 {
        let mut b = [0u8; 16];
        let n = server.read(&mut b).await.unwrap();
        after.extend_from_slice(&b[..n]);
    }
    assert_eq!(after, b"GET / HTTP/1.1\r\n");
}

#[tokio::test(start_paused = true)]
async fn a_header_that_stops_arriving_times_out_and_a_closed_one_says_so() {
    let (mut client, mut server) = tokio::io::duplex(64);
    {
        use tokio::io::AsyncWriteExt;
        client.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
    }
    assert_eq!(read(&mut server, Duration::from_secs(3)).await, Err(Refused::Timeout));
    drop(client);
    let (client, mut server) = tokio::io::duplex(64);
    drop(client);
    assert_eq!(read(&mut server, Duration::from_secs(3)).await, Err(Refused::Closed));
}

#[test]
fn the_header_tern_sends_machines_parses_back_to_the_same_addresses() {
    let cases = [
        ("203.0.113.9:51234", "198.51.100.7:5432", "203.0.113.9:51234", "198.51.100.7:5432"),
        ("[2001:db8::1]:40000", "[2001:db8::2]:443", "[2001:db8::1]:40000", "[2001:db8::2]:443"),
        // A dual-stack listener's view of an IPv4 client: sent as the IPv4 it is.
        ("[::ffff:10.1.2.3]:1000", "[::ffff:10.0.0.1]:80", "10.1.2.3:1000", "10.0.0.1:80"),
        // Families that differ: both as IPv6.
        ("10.1.2.3:1000", "[2001:db8::2]:80", "[::ffff:10.1.2.3]:1000", "[2001:db8::2]:80"),
    ];
    for (src, dst, want_src, want_dst) in cases {
        let h = v2_header(addr(src), addr(dst));
        let (got, used) = parse(&h).unwrap().unwrap();
        assert_eq!(used, h.len());
        assert_eq!(
            got,
            Header::Proxied { source: addr(want_src), destination: addr(want_dst) },
            "{src} → {dst}"
        );
    }
}
