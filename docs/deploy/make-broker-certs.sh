#!/bin/sh
# Make the TLS files of a Murmur broker: a private CA (ca.key, ca.crt) and the broker's key and
# certificate (server.key, server.crt) for the given host name and optional IP addresses.
#
#   sh make-broker-certs.sh OUTDIR broker.lan [192.168.1.10 ...]
#
# Run it on the operator's machine. Copy ca.crt to every peer (broker.ca_file) and
# server.crt + server.key + ca.crt to the broker (/etc/mosquitto/murmur/). Keep ca.key offline:
# whoever holds it can impersonate the broker. Nothing is ever overwritten: an existing CA is
# reused to sign a new server certificate only if server.crt does not exist yet.
# Needs: openssl (Debian package `openssl`, installed by default).
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: $0 OUTDIR HOSTNAME [IP ...]" >&2
    exit 2
fi
out=$1
host=$2
shift 2

umask 077
mkdir -p "$out"
if [ -e "$out/server.crt" ] || [ -e "$out/server.key" ]; then
    echo "$out/server.crt or server.key exists; refusing to overwrite it" >&2
    exit 1
fi

# Names the server certificate is valid for: the host name, and each IP address given.
san="DNS:$host"
for ip in "$@"; do
    san="$san,IP:$ip"
done

if [ ! -e "$out/ca.key" ]; then
    # P-256 keys: fast TLS handshakes on a Pi; 10 years for the CA, rotate the server cert.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days 3650 -subj "/CN=Murmur broker CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$out/ca.key" -out "$out/ca.crt"
fi

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$host" -keyout "$out/server.key" -out "$out/server.csr"
extensions="$out/server.ext"
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
    "$san" > "$extensions"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -days 825 -sha256 -extfile "$extensions" -out "$out/server.crt"
rm -f "$out/server.csr" "$extensions"
chmod 0644 "$out/ca.crt" "$out/server.crt"
echo "CA certificate:     $out/ca.crt   (give to every peer)"
echo "CA key:             $out/ca.key   (secret: keep offline)"
echo "server certificate: $out/server.crt for $san"
echo "server key:         $out/server.key (secret: broker only)"
