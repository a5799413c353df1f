"""A session with a vSphere endpoint (vCenter or ESXi): login, inventory lookups, tasks and
datastore file transfer, with every failure turned into a one-line `VsphereError`.

The URL is govc's form, `https://USER:PASSWORD@HOST[:PORT]/sdk`; a password left out of
it is read from TETHER_VSPHERE_PASSWORD (and a user from TETHER_VSPHERE_USERNAME), so it
need not appear in a process listing. Certificates are checked unless `insecure`.

Datastore files go over the HTTP interface vSphere serves at `/folder/PATH?dcPath=DC&dsName=DS`
(what govc's datastore.upload/download use), authenticated by the API session's cookie.
"""
from __future__ import annotations

import dataclasses
import http.client
import os
import socket
import ssl
import time
import urllib.parse

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

CONNECT_TIMEOUT = 30.0
TASK_POLL = 0.2


class VsphereError(RuntimeError):
    """A failure the user can act on, in one line; `fault` is the vSphere fault behind it."""

    def __init__(self, message: str, fault=None):
        super().__init__(message)
        self.fault = fault


def fault_text(err: BaseException) -> str:
    """The one-line message of a vSphere fault or another exception."""
    msg = getattr(err, "msg", None) or ""
    if isinstance(err, vmodl.MethodFault):
        name = type(err).__name__.rsplit(".", 1)[-1]
        if not msg:
            return name
        return msg.strip().splitlines()[0] if name in msg else f"{name}: {msg.strip().splitlines()[0]}"
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------- the URL

@dataclasses.dataclass
class Target:
    host: str
    port: int
    path: str
    user: str
    password: str
    insecure: bool = False

    @property
    def display(self) -> str:
        """The URL without credentials, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://{host}{port}{self.path}"


def parse_url(text: str | None, insecure: bool = False, env=None) -> Target:
    """`https://USER:PASS@HOST[:PORT]/sdk`, or just `HOST`; credentials may come from env."""
    env = os.environ if env is None else env
    text = text or env.get("TETHER_VSPHERE_URL", "")
    if not text:
        raise VsphereError("no vSphere URL: pass --url https://USER:PASSWORD@HOST/sdk "
                           "(or set TETHER_VSPHERE_URL)")
    if "://" not in text:
        text = "https://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "https":
        raise VsphereError(f"--url {_redact(text)}: the vSphere API is served over https")
    try:
        port = parts.port or 443
    except ValueError:
        raise VsphereError(f"--url {_redact(text)}: bad port") from None
    if not parts.hostname:
        raise VsphereError(f"--url {_redact(text)}: no host")
    user = urllib.parse.unquote(parts.username or "") or env.get("TETHER_VSPHERE_USERNAME", "")
    password = urllib.parse.unquote(parts.password or "") or env.get("TETHER_VSPHERE_PASSWORD", "")
    if not user or not password:
        raise VsphereError(f"--url {_redact(text)}: no user name and password (put them in the "
                           "URL, or set TETHER_VSPHERE_USERNAME and TETHER_VSPHERE_PASSWORD)")
    return Target(parts.hostname, port, parts.path if parts.path not in ("", "/") else "/sdk",
                  user, password, insecure)


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def ssl_context(insecure: bool) -> ssl.SSLContext:
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context()


# --------------------------------------------------------------------------- the session

class Connection:
    """A logged-in API session. Use as a context manager (logs out)."""

    def __init__(self, si, target: Target, context: ssl.SSLContext):
        self.si = si
        self.target = target
        self.ssl_context = context
        self.content = si.RetrieveContent()

    @classmethod
    def open(cls, target: Target, timeout: float = CONNECT_TIMEOUT) -> "Connection":
        context = ssl_context(target.insecure)
        where = target.display
        try:
            si = SmartConnect(host=target.host, port=target.port, path=target.path,
                              user=target.user, pwd=target.password, sslContext=context,
                              httpConnectionTimeout=timeout)
        except vim.fault.InvalidLogin:
            raise VsphereError(f"{where}: login as {target.user!r} failed: incorrect user "
                               "name or password") from None
        except ssl.SSLCertVerificationError as err:
            raise VsphereError(f"{where}: the server's certificate is not trusted "
                               f"({err.verify_message}); pass --insecure to skip the check") from None
        except (socket.gaierror, socket.timeout, ConnectionError, OSError) as err:
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise VsphereError(f"cannot reach {where}: {reason}") from None
        except vmodl.MethodFault as err:
            raise VsphereError(f"{where}: {fault_text(err)}") from None
        except Exception as err:   # noqa: BLE001 - e.g. an HTTP server that is no vSphere
            raise VsphereError(f"{where}: not a vSphere API endpoint ({fault_text(err)})") from None
        return cls(si, target, context)

    def close(self) -> None:
        try:
            Disconnect(self.si)
        except Exception:   # noqa: BLE001 - logging out of a dead session is no error
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inventory
    def datacenter(self, name: str | None = None) -> vim.Datacenter:
        found = self._all(vim.Datacenter)
        if name:
            for dc in found:
                if dc.name == name or self.inventory_path(dc) == name.strip("/"):
                    return dc
            raise VsphereError(f"datacenter {name!r} not found (there: {_names(found)})")
        if len(found) == 1:
            return found[0]
        if not found:
            raise VsphereError(f"{self.target.display}: no datacenter")
        raise VsphereError(f"several datacenters ({_names(found)}): pass --datacenter")

    def _all(self, kind, root=None) -> list:
        view = self.content.viewManager.CreateContainerView(root or self.content.rootFolder,
                                                            [kind], True)
        try:
            return list(view.view)
        finally:
            view.DestroyView()

    def datastore(self, dc: vim.Datacenter, name: str | None) -> vim.Datastore:
        stores = list(dc.datastore)
        if name:
            for ds in stores:
                if ds.name == name:
                    return ds
            raise VsphereError(f"datastore {name!r} not found in datacenter {dc.name} "
                               f"(there: {_names(stores)})")
        if len(stores) == 1:
            return stores[0]
        if not stores:
            raise VsphereError(f"datacenter {dc.name} has no datastore")
        raise VsphereError(f"several datastores in {dc.name} ({_names(stores)}): pass --datastore")

    def networks(self, dc: vim.Datacenter) -> dict[str, object]:
        """Networks by name (standard port groups, distributed port groups, opaque networks);
        uplink port groups are left out: no VM connects to them."""
        out = {}
        for net in self._all(vim.Network, dc.networkFolder):
            if isinstance(net, vim.dvs.DistributedVirtualPortgroup) and net.config.uplink:
                continue
            out.setdefault(net.name, net)
        return out

    def resource_pool(self, dc: vim.Datacenter, path: str | None) -> vim.ResourcePool:
        """A pool by name or inventory path; default: the root pool of the first compute resource."""
        if path:
            for pool in self._all(vim.ResourcePool, dc.hostFolder):
                if pool.name == path or self.inventory_path(pool).endswith(path.strip("/")):
                    return pool
            raise VsphereError(f"resource pool {path!r} not found in datacenter {dc.name}")
        for compute in self._all(vim.ComputeResource, dc.hostFolder):
            if compute.resourcePool is not None:
                return compute.resourcePool
        raise VsphereError(f"datacenter {dc.name} has no host or cluster to run a VM on")

    def host(self, dc: vim.Datacenter, name: str | None) -> vim.HostSystem | None:
        """A host by name (None when not asked for: vSphere or DRS picks one)."""
        if not name:
            return None
        hosts = self._all(vim.HostSystem, dc.hostFolder)
        for host in hosts:
            if host.name == name:
                return host
        raise VsphereError(f"host {name!r} not found in datacenter {dc.name} "
                           f"(there: {_names(hosts)})")

    def folder(self, dc: vim.Datacenter, path: str | None) -> vim.Folder:
        if not path:
            return dc.vmFolder
        for folder in [dc.vmFolder] + self._all(vim.Folder, dc.vmFolder):
            full = self.inventory_path(folder)
            if folder.name == path or full == path.strip("/") or \
                    full.endswith("/vm/" + path.strip("/")):
                return folder
        raise VsphereError(f"VM folder {path!r} not found in datacenter {dc.name}")

    def virtual_machines(self, root) -> list[vim.VirtualMachine]:
        return self._all(vim.VirtualMachine, root)

    def inventory_path(self, entity) -> str:
        names = []
        while entity is not None and entity != self.content.rootFolder:
            names.append(entity.name)
            entity = entity.parent
        return "/".join(reversed(names))

    # -- properties and tasks
    def properties(self, objects: list, kind, paths: list[str]) -> list[dict]:
        """One RetrievePropertiesEx for `paths` of every object; each dict has 'obj'."""
        if not objects:
            return []
        collector = self.content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=o, skip=False) for o in objects],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=kind, pathSet=paths)])
        out = []
        result = collector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        while result is not None:
            for item in result.objects:
                row = {prop.name: prop.val for prop in item.propSet}
                row["obj"] = item.obj
                out.append(row)
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
        return out

    def wait(self, task, what: str, timeout: float | None = None):
        """The task's result; VsphereError naming `what` when it fails."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Only these fields: a whole TaskInfo may name an entity pyVmomi's types reject
            # (the simulator's file tasks name the FileManager).
            rows = self.properties([task], vim.Task, ["info.state", "info.error", "info.result"])
            info = rows[0] if rows else {}
            state = info.get("info.state")
            if state == vim.TaskInfo.State.success:
                return info.get("info.result")
            if state == vim.TaskInfo.State.error:
                error = info.get("info.error")
                raise VsphereError(f"{what}: {fault_text(error)}", error)
            if deadline is not None and time.monotonic() > deadline:
                raise VsphereError(f"{what}: no answer within {timeout:g} s")
            time.sleep(TASK_POLL)

    # -- datastore files
    def datastore_path(self, ds: vim.Datastore, path: str) -> str:
        return f"[{ds.name}] {path}"

    def file_exists(self, dc: vim.Datacenter, ds: vim.Datastore, path: str) -> bool:
        """Whether `path` (relative to the datastore's root) is a file there."""
        directory, _, name = path.rpartition("/")
        spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=[name])
        try:
            task = ds.browser.SearchDatastore_Task(self.datastore_path(ds, directory), spec)
            result = self.wait(task, f"searching [{ds.name}] {directory or '/'}")
        except VsphereError as err:
            if isinstance(err.fault, vim.fault.FileNotFound):     # no such directory
                return False
            raise
        return any(f.path == name for f in (result.file or []))

    def make_directory(self, dc: vim.Datacenter, ds: vim.Datastore, path: str) -> None:
        try:
            self.content.fileManager.MakeDirectory(name=self.datastore_path(ds, path),
                                                   datacenter=dc, createParentDirectories=True)
        except vim.fault.FileAlreadyExists:
            pass
        except vmodl.MethodFault as err:
            raise VsphereError(f"creating [{ds.name}] {path}: {fault_text(err)}") from None

    def move_file(self, dc, ds, source: str, target: str) -> None:
        task = self.content.fileManager.MoveDatastoreFile_Task(
            sourceName=self.datastore_path(ds, source), sourceDatacenter=dc,
            destinationName=self.datastore_path(ds, target), destinationDatacenter=dc, force=False)
        self.wait(task, f"moving [{ds.name}] {source} to {target}")

    def delete_file(self, dc, ds, path: str) -> None:
        task = self.content.fileManager.DeleteDatastoreFile_Task(
            name=self.datastore_path(ds, path), datacenter=dc)
        self.wait(task, f"deleting [{ds.name}] {path}")

    def _http(self, method: str, dc, ds, path: str, body=None, length: int | None = None):
        query = urllib.parse.urlencode({"dcPath": self.inventory_path(dc), "dsName": ds.name})
        url = f"/folder/{urllib.parse.quote(path)}?{query}"
        conn = http.client.HTTPSConnection(self.target.host, self.target.port,
                                           context=self.ssl_context, timeout=CONNECT_TIMEOUT)
        headers = {"Cookie": self.si._stub.cookie.split(";")[0]}
        if length is not None:
            headers["Content-Length"] = str(length)
            headers["Content-Type"] = "application/octet-stream"
        try:
            conn.request(method, url, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except OSError as err:
            conn.close()
            raise VsphereError(f"{method} [{ds.name}] {path}: {err}") from None
        conn.close()
        return response.status, data

    def upload(self, dc, ds, path: str, local_file: str) -> None:
        size = os.path.getsize(local_file)
        with open(local_file, "rb") as body:
            status, data = self._http("PUT", dc, ds, path, body=body, length=size)
        if status not in (200, 201, 204):
            raise VsphereError(f"uploading {local_file} to [{ds.name}] {path}: HTTP {status} "
                               f"{data[:200].decode('utf-8', 'replace').strip()}")

    def download(self, dc, ds, path: str) -> bytes | None:
        """The file's bytes; None when there is no such file."""
        status, data = self._http("GET", dc, ds, path)
        if status == 404:
            return None
        if status != 200:
            raise VsphereError(f"downloading [{ds.name}] {path}: HTTP {status}")
        return data


def split_datastore_path(text: str) -> tuple[str, str]:
    """`[ds] dir/file` -> ('ds', 'dir/file')."""
    if not text.startswith("[") or "]" not in text:
        raise VsphereError(f"{text!r} is not a datastore path like '[datastore1] dir/file'")
    name, _, rest = text[1:].partition("]")
    return name, rest.strip()


def _names(items) -> str:
    return ", ".join(sorted(i.name for i in items)) or "none"
