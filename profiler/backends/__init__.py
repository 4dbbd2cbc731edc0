"""Measurement backends: ``engine`` (in-process step timing), ``http`` (closed-loop load against any
OpenAI-compatible server), ``vllm`` (launches ``vllm serve`` per configuration, then ``http``)."""
