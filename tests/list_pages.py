"""FAKE LAYERS, for tests only: translators for tests/gcs_xml_proxy.py's proxy that make the GCS
and Azure emulators answer obstore's listings in pages of ``page_size`` objects, so a test
crosses page boundaries with a few hundred objects instead of the clouds' own pages (GCS's XML
API: 1,000 keys; Azure's List Blobs: 5,000, Azurite's too).

Why: obstore sends no page size (object_store's GCS ``max_list_results`` is always unset, Azure
sends no ``maxresults``; its ``chunk_size`` only regroups what came back), so the server's
default decides, and

- fake-gcs-server (1.54) ignores ``max-keys`` and ``continuation-token`` on its XML listing and
  answers every object in one page, never truncated: obstore's paging on GCS never runs
  against it. ``GcsListPages`` serves those XML listings from the emulator's JSON API, which
  does page (``maxResults``, ``pageToken``): the page boundaries and tokens are the
  emulator's, the XML (``NextContinuationToken``, ``IsTruncated``) is built here in the shape
  GCS's XML API answers. Writes are translated as tests/gcs_xml_proxy.py does.
- Azurite pages at 5,000 and honours ``maxresults``; ``AzureListPages`` adds
  ``maxresults=page_size`` to each List Blobs request and forwards everything unchanged
  otherwise: the pages and ``NextMarker`` are Azurite's own. A Shared Key signature covers the
  query, so clients reach it with a SAS token (whose signature does not).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from gcs_xml_proxy import _JSON_PREFIXES, Reply, Translator, _error


class GcsListPages(Translator):
    """tests/gcs_xml_proxy.py's translations plus XML listings in pages of ``page_size``
    (``counts["list"]``: listing pages served)."""

    def __init__(self, upstream: str, page_size: int) -> None:
        super().__init__(upstream)
        self.page_size = page_size

    def translate(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Reply | None:
        url = urlsplit(target)
        bucket, _, raw_key = url.path.lstrip("/").partition("/")
        query = parse_qs(url.query, keep_blank_values=True)
        is_listing = method == "GET" and bucket and not raw_key and "list-type" in query
        if is_listing and not url.path.startswith(_JSON_PREFIXES):
            return self.list_page(unquote(bucket), {k: v[0] for k, v in query.items()})
        return super().translate(method, target, headers, body)

    def list_page(self, bucket: str, query: dict[str, str]) -> Reply:
        """One page of an XML listing (``list-type=2``), from one JSON-API listing page."""
        self.counts["list"] += 1
        if query.get("start-after"):
            return _error(501, "NotImplemented", "start-after is not translated here")
        size = min(self.page_size, int(query.get("max-keys") or self.page_size))
        params = {"maxResults": str(size)}
        for xml_name, json_name in (("prefix", "prefix"), ("delimiter", "delimiter"),
                                    ("continuation-token", "pageToken")):  # fmt: skip
            if query.get(xml_name):
                params[json_name] = query[xml_name]
        answer = self.call("GET", f"/storage/v1/b/{quote(bucket, safe='')}/o?{urlencode(params)}",
                           {}, b"")  # fmt: skip
        if answer.status == 404:
            return _error(404, "NoSuchBucket", f"bucket {bucket!r} not found")
        if answer.status != 200:
            return answer
        body = _list_result(bucket, query, size, json.loads(answer.body))
        return Reply(200, {"Content-Type": "application/xml"}, body)


def _list_result(bucket: str, query: dict[str, str], size: int, page: dict) -> bytes:
    """A ``ListBucketResult`` as GCS's XML API writes it, from a JSON-API listing page."""
    items, prefixes, token = page.get("items", []), page.get("prefixes", []), page.get(
        "nextPageToken")  # fmt: skip
    root = ET.Element("ListBucketResult")
    fields = {"Name": bucket, "Prefix": query.get("prefix", ""),
              "Delimiter": query.get("delimiter", ""), "KeyCount": str(len(items) + len(prefixes)),
              "MaxKeys": str(size), "IsTruncated": "true" if token else "false"}  # fmt: skip
    if token:
        fields["NextContinuationToken"] = token
    for name, value in fields.items():
        ET.SubElement(root, name).text = value
    for item in items:
        entry = ET.SubElement(root, "Contents")
        for name, value in (("Key", item["name"]), ("Generation", item["generation"]),
                            ("LastModified", item["updated"]), ("ETag", item["etag"]),
                            ("Size", item["size"])):  # fmt: skip
            ET.SubElement(entry, name).text = str(value)
    for prefix in prefixes:
        ET.SubElement(ET.SubElement(root, "CommonPrefixes"), "Prefix").text = prefix
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


class AzureListPages(Translator):
    """Everything forwarded unchanged, List Blobs with ``maxresults=page_size`` added
    (``counts["list"]``: listing pages asked for)."""

    def __init__(self, upstream: str, page_size: int) -> None:
        super().__init__(upstream)
        self.page_size = page_size

    def translate(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Reply | None:
        query = parse_qs(urlsplit(target).query)
        if method != "GET" or query.get("comp") != ["list"] or "maxresults" in query:
            return None
        self.counts["list"] += 1
        return self.call(method, f"{target}&maxresults={self.page_size}", headers, body)
