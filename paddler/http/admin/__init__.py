"""The web admin panel (``--web-admin-panel-addr``): a page app served by the balancer.

It serves only files and its configuration; the browser does everything else through
the public management and inference services, with their API keys, which the page
asks for and keeps in ``sessionStorage`` (the browser tab's session, never the disk).
The files are plain HTML, CSS and JavaScript modules in ``static/``, shipped inside the
package: no build step, no CDN, nothing fetched from elsewhere.

Every answer carries a Content-Security-Policy allowing scripts and styles of the
panel's own origin only, and connections to the panel and the two services; the
scripts build the page with ``textContent``, never with HTML from data.
"""

from __future__ import annotations

from paddler.http.admin.app import create_app

__all__ = ["create_app"]
