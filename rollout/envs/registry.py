"""Image references and what a registry says about them: the download size of an image, read from its
manifest before it is pulled (prepare.py checks the disk budget with it). Anonymous access only: a registry
that wants credentials gives no size, and the pull itself (the Docker engine, with its own credentials)
decides."""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

DOCKER_HUB = "registry-1.docker.io"
MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"))


@dataclass(frozen=True)
class ImageRef:
    registry: str     # host[:port]; DOCKER_HUB for Docker Hub names
    repository: str   # library/python, swebench/sweb.eval.x86_64.x
    tag: str          # the tag, or a digest (sha256:...)

    @property
    def pull_args(self) -> tuple[str, str]:
        """(repository, tag) as Docker's pull API takes them (the registry host is part of the name)."""
        name = self.repository if self.registry == DOCKER_HUB else f"{self.registry}/{self.repository}"
        if name.startswith("library/") and self.registry == DOCKER_HUB:
            name = name[len("library/"):]
        return name, self.tag


def parse_ref(image: str) -> ImageRef:
    """An image reference as Docker reads it: the first component is a registry when it has a dot or a
    port, or is localhost."""
    if not image or any(c.isspace() for c in image):
        raise ValueError(f"image {image!r}: not an image reference")
    name, tag = image, "latest"
    if "@" in name:
        name, tag = name.split("@", 1)
    elif re.search(r":[^/]+$", name):
        name, tag = name.rsplit(":", 1)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, name if "/" in name else f"library/{name}"
    return ImageRef(registry, repository, tag)


def _scheme(registry: str) -> str:
    host = registry.rsplit(":", 1)[0]
    return "http" if host in ("localhost", "::1") or host.startswith("127.") else "https"


def _get(url: str, token: str | None, timeout: float) -> tuple[dict, str]:
    request = urllib.request.Request(url, headers={"Accept": MANIFEST_TYPES,
                                                   **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read()), response.headers.get("Content-Type", "")


def _anonymous_token(challenge: str, timeout: float) -> str | None:
    """A pull token for a `Bearer realm=...,service=...,scope=...` challenge (Docker Hub's anonymous flow)."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    if not challenge.lower().startswith("bearer") or "realm" not in fields:
        return None
    query = "&".join(f"{k}={urllib.request.quote(v)}" for k, v in fields.items() if k in ("service", "scope"))
    with urllib.request.urlopen(f"{fields['realm']}?{query}", timeout=timeout) as response:
        body = json.loads(response.read())
    return body.get("token") or body.get("access_token")


def download_size(image: str, architecture: str = "amd64", timeout: float = 15.0) -> int | None:
    """The compressed bytes of `image`'s layers and config for `architecture`, or None when the registry
    cannot say (unreachable, needs credentials, an unknown manifest type)."""
    ref = parse_ref(image)
    base = f"{_scheme(ref.registry)}://{ref.registry}/v2/{ref.repository}/manifests/"
    token = None
    try:
        try:
            manifest, kind = _get(base + ref.tag, None, timeout)
        except urllib.error.HTTPError as e:
            if e.code != 401:
                return None
            token = _anonymous_token(e.headers.get("Www-Authenticate", ""), timeout)
            if token is None:
                return None
            manifest, kind = _get(base + ref.tag, token, timeout)
        if "manifests" in manifest:   # an index: the entry for this machine's architecture
            entries = [m for m in manifest["manifests"]
                       if m.get("platform", {}).get("architecture") == architecture
                       and m.get("platform", {}).get("os", "linux") == "linux"]
            if not entries:
                return None
            manifest, kind = _get(base + entries[0]["digest"], token, timeout)
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            return None
        return sum(int(layer.get("size", 0)) for layer in layers) + int(manifest.get("config", {}).get("size", 0))
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None
