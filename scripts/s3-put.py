#!/usr/bin/env python3
"""Uploads objects to an S3 server with boto3, as users do: keys stored as raw UTF-8.

Tests use it so that what they read through Granary reached the backend through an independent
client, not through object_store (whose `Path::from` would percent-encode the same names).

    s3-put.py ENDPOINT BUCKET < objects.json

objects.json is a JSON list of [key, local file path]; an empty file under a key ending in '/' is
a folder marker. Credentials come from AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY. Path-style addressing, region us-east-1.
"""
import json
import sys

import boto3
from botocore.config import Config


def main():
    endpoint, bucket = sys.argv[1], sys.argv[2]
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}),
    )
    for key, path in json.load(sys.stdin):
        with open(path, "rb") as f:
            body = f.read()
        s3.put_object(Bucket=bucket, Key=key, Body=body)


if __name__ == "__main__":
    main()
