"""The operator dashboard, served by ``cycles serve`` at ``/dashboard`` and by ``cycles dashboard``.

Server-rendered pages (Jinja2 templates, inline SVG charts) with htmx for in-place changes; the
templates, the stylesheet and htmx itself (``static/htmx.min.js``, 2.0.11, from the npm package
``htmx.org``, Zero-Clause BSD: ``static/htmx.LICENSE``) ship as package data: no build step.
"""

from cycles.dashboard.views import PREFIX, Dashboard, dashboard_routes

__all__ = ["PREFIX", "Dashboard", "dashboard_routes"]
