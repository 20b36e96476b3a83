"""The dashboard's ``HOST:PORT`` (checked when the config loads, without the web server's imports)."""

from __future__ import annotations

from umm.errors import UmmError

DEFAULT_HOST = "127.0.0.1"
#: where a running coordinator writes its dashboard's URL (in its data_dir), as it does ``status_address``
URL_FILE = "dashboard_url"


class DashboardError(UmmError):
    """The dashboard cannot be served as asked (a malformed HOST:PORT, a port in use)."""


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` as (host, port); the host defaults to
    127.0.0.1 (loopback only) and port 0 picks a free port."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise DashboardError(f"--dashboard {text!r}: write an IPv6 host in brackets, e.g. [::1]:8080")
    if not port.isdigit() or not 0 <= int(port) <= 65535 or any(c in host for c in "/[] @"):
        raise DashboardError(f"--dashboard {text!r} is not HOST:PORT (e.g. 127.0.0.1:8080 or :8080)")
    return host or DEFAULT_HOST, int(port)


def url_of(host: str, port: int) -> str:
    """The page's URL on ``host:port`` (IPv6 hosts in brackets)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
