#!/usr/bin/env bash
# Make a local certificate authority and certificates for development and
# tests: TLS at the edge (Envoy) and mutual TLS between Envoy, the router and
# the adapters. Not for production: keys are unencrypted and valid 30 days.
#
# Usage: scripts/dev_ca.sh OUT_DIR [EXTRA_DNS_NAME ...]
# Writes OUT_DIR/ca.pem and, for each of envoy, router, adapter and client,
# NAME.pem and NAME-key.pem. Every certificate is good for both server and
# client authentication and names localhost, 127.0.0.1, ::1, its compose
# service names, and any extra names given.
set -euo pipefail

out="${1:?usage: scripts/dev_ca.sh OUT_DIR [EXTRA_DNS_NAME ...]}"
shift
mkdir -p "$out"
cd "$out"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj "/CN=llmmesh development CA" -keyout ca-key.pem -out ca.pem 2>/dev/null

issue() {
  local name="$1" san="$2"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=llmmesh-$name" -keyout "$name-key.pem" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
    -days 30 -out "$name.pem" -extfile <(printf '%s\n' \
      "subjectAltName=$san" \
      "extendedKeyUsage=serverAuth,clientAuth" \
      "keyUsage=digitalSignature,keyEncipherment") 2>/dev/null
  rm -f "$name.csr"
}

extra=""
for dns in "$@"; do extra+=",DNS:$dns"; done
local_names="DNS:localhost,IP:127.0.0.1,IP:::1"
issue envoy "$local_names,DNS:envoy$extra"
issue router "$local_names,DNS:router$extra"
issue adapter "$local_names,DNS:adapter-qwen2,DNS:adapter-llama3$extra"
issue client "$local_names$extra"
rm -f ca.srl
chmod 600 ./*-key.pem
echo "certificates in $out: ca.pem, {envoy,router,adapter,client}{.pem,-key.pem}"
