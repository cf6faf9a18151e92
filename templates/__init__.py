"""The gateway's and manager's templates and their static files.

This folder stays at the top of the repository; the build installs it as the
package ``imagecache.templates`` (setup.cfg), so ``imagecache.app.TEMPLATES``
finds it through importlib.resources, installed or editable alike.
"""
