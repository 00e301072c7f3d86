"""What leaves the monitor: alert sinks, the Prometheus exposition, the generated Prometheus and
Grafana files, and the HTML report."""
