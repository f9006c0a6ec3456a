"""Where a peer's broker is and how it authenticates to it: :class:`BrokerSettings`.

Kept apart from the transport so that configuration code (peer/config_tables.py) can check a broker
section without the MQTT client; ``peer.network.transport`` re-exports the names.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MQTT_VERSIONS = ("3.1.1", "5")


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to authenticate to it.

    ``mqtt_version`` is "3.1.1" (default: every broker speaks it, including the embedded
    amqtt one) or "5". Murmur uses no feature of either beyond publish/subscribe, QoS 1,
    retained messages and the last will, so any standard broker or cluster works.

    ``url`` is ``mqtt://host[:port]`` (plain TCP, default port 1883) or
    ``mqtts://host[:port]`` (TLS, default port 8883). With TLS the server certificate is always
    verified, against ``ca_file`` when given, else against the system's trusted CAs; the host
    name is checked. ``client_cert``/``client_key`` add a TLS client certificate. ``username``
    and ``password`` are sent in the MQTT CONNECT packet: use them only over TLS or loopback.
    """

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    keepalive_s: int = 30
    mqtt_version: str = "3.1.1"

    def __post_init__(self) -> None:
        # Fail at construction, not at the first connection attempt minutes later.
        self.endpoint()
        if self.mqtt_version not in MQTT_VERSIONS:
            raise ValueError(f"mqtt_version must be one of {', '.join(MQTT_VERSIONS)}, "
                             f"got {self.mqtt_version!r}")
        if not 5 <= self.keepalive_s <= 65535:
            raise ValueError(f"keepalive_s must be in 5..65535, got {self.keepalive_s}")
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key given without client_cert")
        if self.password is not None and self.username is None:
            raise ValueError("password given without username")

    def endpoint(self) -> tuple[str, int, bool]:
        """Return (host, port, use_tls) parsed from ``url``; ValueError when it is unusable."""
        parts = urlsplit(self.url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"broker url must start with mqtt:// or mqtts://, got {self.url!r}")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"broker url has a bad port: {self.url!r}") from exc
        host = parts.hostname
        if not host:
            raise ValueError(f"broker url has no host: {self.url!r}")
        if parts.username or parts.password:
            # Credentials in a URL end up in logs and process listings.
            raise ValueError("put broker credentials in username/password, not in the url")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"broker url must be scheme://host[:port], got {self.url!r}")
        return unquote(host), port or _DEFAULT_PORTS[scheme], scheme == "mqtts"

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``mqtts://`` (certificate + host name verification), else None."""
        _host, _port, use_tls = self.endpoint()
        if not use_tls:
            return None
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.client_cert is not None:
            context.load_cert_chain(
                str(self.client_cert),
                str(self.client_key) if self.client_key is not None else None,
            )
        return context
