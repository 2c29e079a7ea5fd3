# Sourced by examples/fleet/*.sh and benches/fleet/*.sh: the tools a fleet needs, and the build.
#
# fleet_tools            etcd and etcdctl (Debian etcd-server, etcd-client), python3, ss;
#                        installs the Debian packages if missing
# fleet_build PROFILE    builds tern and the test_machine example (debug | release) unless
#                        TERN and TEST_MACHINE are set

fleet_tools() {
  local need=()
  command -v etcd >/dev/null || need+=(etcd-server)
  command -v etcdctl >/dev/null || need+=(etcd-client)
  command -v ss >/dev/null || need+=(iproute2)
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} from Debian" >&2
    local sudo=
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    # Where systemd runs, the package starts a system etcd on 127.0.0.1:2379; the fleet's
    # members are on addresses of their own and never meet it.
  fi
  command -v python3 >/dev/null || { echo "python3 is needed (the fleet's driver)" >&2; exit 2; }
}

fleet_build() {
  if [ -n "${TERN:-}" ] && [ -n "${TEST_MACHINE:-}" ]; then return; fi
  local flag=
  [ "$1" = release ] && flag=--release
  echo "building tern and test_machine ($1); the first build takes minutes" >&2
  (cd "$root" && cargo build $flag --quiet --bin tern --example test_machine)
}
