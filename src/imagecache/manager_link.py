"""The gateway's calls to the manager, for the admin part of the HTTP API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from imagecache.errors import ImagecacheError, ServiceUnavailable


class ManagerError(ImagecacheError):
    """The manager refused a request; carries its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


class ManagerLink:
    """Forwards admin calls to the manager's internal API with the shared token."""

    # A resize answers once its keys have moved: allow for big migrations.
    def __init__(self, base_url: str, token: str, timeout: float = 120.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def call(self, name: str, params: Mapping[str, str]) -> dict[str, Any]:
        """The manager's JSON answer to ``name``; raises ManagerError or ServiceUnavailable."""
        return await self._post(name, data=dict(params))

    async def call_json(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """As ``call``, with a JSON body (the key samples: too many for a form)."""
        return await self._post(name, json=payload)

    async def _post(self, name: str, **body: Any) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"{self._base_url}/internal/{name}"
        try:
            async with self._session.post(
                url, headers={"Authorization": f"Bearer {self._token}"}, **body
            ) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise ServiceUnavailable(f"the manager at {self._base_url} is not reachable") from error
        if not isinstance(body, dict):
            raise ServiceUnavailable("the manager gave an unexpected answer")
        if response.status >= 400:
            details = body.get("error", {})
            raise ManagerError(response.status, str(details.get("message", "manager error")))
        return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
