"""Fusion buckets (``signcomm.buckets``), under their earlier import path."""
from ..buckets import DEFAULT_BUCKET_ELEMENTS, Bucket, plan_buckets  # noqa: F401
