"""Correction daemon: scrape live vLLM-style metrics, correct the plan, send decisions to a connector."""

from planner.daemon.connectors import Connector, FileConnector, HttpConnector, LogConnector, make_connector
from planner.daemon.runner import CorrectionDaemon, DaemonConfig
from planner.daemon.scrape import MetricsSnapshot, parse_metrics

__all__ = [
    "Connector",
    "CorrectionDaemon",
    "DaemonConfig",
    "FileConnector",
    "HttpConnector",
    "LogConnector",
    "MetricsSnapshot",
    "make_connector",
    "parse_metrics",
]
