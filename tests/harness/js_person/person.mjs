// A test person on matrix-js-sdk with its Rust crypto (WebAssembly, in memory), configured as today's Element:
// only devices cross-signed by their owner get room keys, and only their messages decrypt.
//
// Protocol (tests/harness/js_person.py drives it): one JSON request per line on stdin, {"id": N, "op": ..., ...};
// one JSON reply per line on stdout, {"id": N, "ok": true, "result": ...} or {"id": N, "ok": false, "error": ...};
// unsolicited lines {"event": "timeline", ...} (each outcome of each timeline event: clear, decrypted, or a
// decryption failure) and {"event": "devices", "user_ids": [...]} (the SDK's view of some users' devices or
// identity changed). Logs go to stderr only.

import readline from "node:readline";

// matrix-js-sdk 43 wants Node 22's Promise.withResolvers; on Node 20 this supplies it (before the SDK loads).
Promise.withResolvers ??= function () {
    let resolve, reject;
    const promise = new this((res, rej) => ((resolve = res), (reject = rej)));
    return { promise, resolve, reject };
};

// The SDK and its WebAssembly log through console, to stderr here (stdout is the protocol's): warnings and errors,
// and the rest too with JS_PERSON_VERBOSE=1.
const verbose = process.env.JS_PERSON_VERBOSE === "1";
for (const method of ["log", "info", "debug", "trace"]) console[method] = verbose ? console.error : () => {};
console.warn = console.error;

const sdk = await import("matrix-js-sdk");
const { CryptoEvent, OnlySignedDevicesIsolationMode, VerificationPhase, VerificationRequestEvent, VerifierEvent } =
    await import("matrix-js-sdk/lib/crypto-api/index.js");

let client = null;
const incoming = []; // verification requests other devices sent to this one, oldest first
const reported = new Map(); // event_id -> the last outcome written, so each outcome is written once

function write(line) {
    process.stdout.write(JSON.stringify(line) + "\n");
}

function log(message) {
    process.stderr.write(`js_person: ${message}\n`);
}

function crypto() {
    if (client === null) throw new Error("not logged in");
    return client.getCrypto();
}

// Resolves once `check()` holds, checking now and after each sync (the only way the client learns anything).
async function afterSync(check) {
    while (!(await check())) {
        await new Promise((resolve) => client.once(sdk.ClientEvent.Sync, resolve));
    }
}

// Writes a timeline event once its decryption (if any) has settled, and again whenever its outcome changes
// (a late room key turns a failure into clear text, or into another failure).
function report(event) {
    const eventId = event.getId();
    if (!eventId?.startsWith("$") || event.isBeingDecrypted()) return; // a local echo, or not settled yet
    if (event.isEncrypted() && !event.isDecryptionFailure() && event.getClearContent() === null) return; // not tried yet
    const line = {
        event: "timeline",
        room_id: event.getRoomId(),
        event_id: eventId,
        sender: event.getSender(),
        type: event.getType(),
        state_key: event.getStateKey() ?? null,
        encrypted: event.isEncrypted(),
        content: event.isDecryptionFailure() ? null : event.getContent(),
        decryption_failure: event.isDecryptionFailure() ? event.decryptionFailureReason : null,
    };
    const outcome = JSON.stringify([line.type, line.content, line.decryption_failure]);
    if (reported.get(eventId) === outcome) return;
    reported.set(eventId, outcome);
    write(line);
}

// Answers a user-interactive auth challenge with the account's password (the m.login.password flow).
function passwordAuth(password) {
    return async (makeRequest) => {
        try {
            return await makeRequest(null);
        } catch (error) {
            if (error.httpStatus !== 401 || !error.data?.flows) throw error;
            const identifier = { type: "m.id.user", user: client.getUserId() };
            return await makeRequest({ type: "m.login.password", identifier, password, session: error.data.session });
        }
    };
}

// What a person compares: the emoji (symbols) and the numbers.
function shownSas(generated) {
    return { emoji: generated.emoji.map(([symbol]) => symbol), decimals: generated.decimal ?? null };
}

const ops = {
    // Log in with a password, start crypto (in memory, OnlySignedDevices) and the client; after the first sync.
    async login({ base_url, user_id, password }) {
        const anonymous = sdk.createClient({ baseUrl: base_url });
        const identifier = { type: "m.id.user", user: user_id };
        const session = await anonymous.loginRequest({ type: "m.login.password", identifier, password });
        client = sdk.createClient({
            baseUrl: base_url,
            userId: session.user_id,
            deviceId: session.device_id,
            accessToken: session.access_token,
        });
        await client.initRustCrypto({ useIndexedDB: false });
        client.getCrypto().setDeviceIsolationMode(new OnlySignedDevicesIsolationMode());
        client.on(sdk.RoomEvent.Timeline, report);
        client.on(sdk.MatrixEventEvent.Decrypted, report);
        const devices = (userIds) => write({ event: "devices", user_ids: [...userIds] });
        client.on(CryptoEvent.DevicesUpdated, devices);
        client.on(CryptoEvent.UserTrustStatusChanged, (userId) => devices([userId]));
        client.on(CryptoEvent.VerificationRequestReceived, (request) => incoming.push(request));
        const prepared = new Promise((resolve) =>
            client.on(sdk.ClientEvent.Sync, (state) => state === sdk.SyncState.Prepared && resolve()),
        );
        await client.startClient({ initialSyncLimit: 50 });
        await prepared;
        log(`logged in as ${session.user_id} on device ${session.device_id}`);
        return { device_id: session.device_id };
    },

    // Create and upload this user's cross-signing keys, signing this device; the public master key.
    async bootstrap_cross_signing({ password }) {
        await crypto().bootstrapCrossSigning({
            setupNewCrossSigning: true,
            authUploadDeviceSigningKeys: passwordAuth(password),
        });
        return { master_key: await crypto().getCrossSigningKeyId() };
    },

    // Sign another device of this user with this session's self-signing key.
    async cross_sign_device({ device_id }) {
        await crypto().getUserDeviceInfo([client.getUserId()], true);
        await crypto().crossSignDevice(device_id);
        return {};
    },

    // Verify a device with emoji, as Element's "Verify session" does: request, start SAS once the other side is
    // ready, confirm the emoji (the test compares them with the other side's, returned here once both sides are
    // done, see shownSas). Verifying one of this user's own devices signs it with this session's self-signing key.
    async verify_device({ user_id, device_id }) {
        await crypto().getUserDeviceInfo([user_id], true);
        const request = await crypto().requestDeviceVerification(user_id, device_id);
        while (request.phase !== VerificationPhase.Ready) {
            if (request.phase === VerificationPhase.Cancelled) throw new Error(`cancelled: ${request.cancellationCode}`);
            await new Promise((resolve) => request.once(VerificationRequestEvent.Change, resolve));
        }
        const verifier = await request.startVerification("m.sas.v1");
        const shown = new Promise((resolve) => verifier.once(VerifierEvent.ShowSas, resolve));
        const done = verifier.verify();
        const sas = await shown;
        await sas.confirm();
        await done;
        return shownSas(sas.sas);
    },

    // Accept the next emoji verification a device of `user_id` requests, as a person clicking through Element's
    // incoming request does, and confirm the emoji; what was shown (shownSas), once both sides are done.
    async accept_verification({ user_id }) {
        let request;
        await afterSync(() => (request = incoming.find((r) => r.otherUserId === user_id)) !== undefined);
        incoming.splice(incoming.indexOf(request), 1);
        await request.accept();
        while (request.verifier === undefined) {
            if (request.phase === VerificationPhase.Cancelled) throw new Error(`cancelled: ${request.cancellationCode}`);
            await new Promise((resolve) => request.once(VerificationRequestEvent.Change, resolve));
        }
        const shown = new Promise((resolve) => request.verifier.once(VerifierEvent.ShowSas, resolve));
        const done = request.verifier.verify();
        const sas = await shown;
        await sas.confirm();
        await done;
        return shownSas(sas.sas);
    },

    // Create a room (encrypted as Element does, unless told otherwise); returns once this client has synced it.
    async create_room({ invite = [], encrypted = true }) {
        const initial_state = encrypted
            ? [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }]
            : [];
        const { room_id } = await client.createRoom({ invite, initial_state, preset: "private_chat" });
        await afterSync(() => client.getRoom(room_id)?.getMyMembership() === "join");
        return { room_id };
    },

    // Join a room; returns once this client has synced the join (so it knows the room's encryption).
    async join({ room_id }) {
        await client.joinRoom(room_id);
        await afterSync(() => client.getRoom(room_id)?.getMyMembership() === "join");
        return {};
    },

    // Send an m.text message, encrypted in encrypted rooms; the SDK shares the room key per the isolation mode.
    async send_text({ room_id, text }) {
        const { event_id } = await client.sendMessage(room_id, { msgtype: "m.text", body: text });
        return { event_id };
    },

    // How this device sees another device: signed by its owner, verified, known at all (keys downloaded first).
    async device_status({ user_id, device_id }) {
        const devices = await crypto().getUserDeviceInfo([user_id], true);
        const status = await crypto().getDeviceVerificationStatus(user_id, device_id);
        return {
            known: devices.get(user_id)?.has(device_id) ?? false,
            signed_by_owner: status?.signedByOwner ?? false,
            cross_signing_verified: status?.crossSigningVerified ?? false,
            locally_verified: status?.localVerified ?? false,
        };
    },

    // A user's public master key as this device knows it (null without one), and whether we verified them.
    async user_identity({ user_id }) {
        await crypto().getUserDeviceInfo([user_id], true);
        const keys = await crypto().getUserCrossSigningKeys(user_id);
        const status = await crypto().getUserVerificationStatus(user_id);
        const master = keys?.master_key ? Object.values(keys.master_key.keys)[0] : null;
        return { master_key: master, verified: status.isVerified() };
    },

    // Whether encryption is on in a room, as this client's crypto sees it.
    async room_encrypted({ room_id }) {
        return { encrypted: await crypto().isEncryptionEnabledInRoom(room_id) };
    },

    // Stop the client and exit.
    async close() {
        client?.stopClient();
        setImmediate(() => process.exit(0));
        return {};
    },
};

for await (const text of readline.createInterface({ input: process.stdin })) {
    const { id, op, ...args } = JSON.parse(text);
    const handler = ops[op];
    if (handler === undefined) {
        write({ id, ok: false, error: `unknown op ${op}` });
        continue;
    }
    handler(args).then(
        (result) => write({ id, ok: true, result }),
        (error) => {
            log(`${op} failed: ${error?.stack ?? error}`);
            write({ id, ok: false, error: String(error?.message ?? error) });
        },
    );
}
client?.stopClient();
process.exit(0);
