// Drives the real ComfyUI web UI in headless Debian chromium (npm playwright-core, never a downloaded browser):
// lists the pack's workflows as the Templates browser does (GET /api/workflow_templates), fetches each from the
// route that serves them and loads it through the app's own load path (app.loadGraphData), reports node types the frontend
// does not know, the nodes it flags with errors, links that do not join the slots they name, and the API graph the frontend itself makes of each
// (app.graphToPrompt); reads the node library's entries for the Quickstep nodes; queues one workflow from the UI,
// waits for it in /history and saves a screenshot. tests/test_frontend.py asserts on what this writes.
// env: COMFY_URL, PACK (the pack's custom_nodes folder name), QUEUE (name of the workflow to queue), RESULT (JSON out),
//      SCREENSHOT (PNG out), NODE_PATH (holds playwright-core)
const { chromium } = require('playwright-core');
const fs = require('fs');
const os = require('os');
const path = require('path');

const URL = process.env.COMFY_URL;
const PACK = process.env.PACK;

// What the loaded graph looks like: unknown node types, and every link checked at both of its ends.
function inspectGraph(expectedNodes, expectedLinks) {
  const graph = window.app.graph;
  const registered = window.LiteGraph.registered_node_types;
  const nodes = graph._nodes;
  const missing = nodes.filter(n => !(n.type in registered)).map(n => n.type);
  // newer frontends also flag a known node whose input names a file the server does not have (a model to download)
  const flagged = nodes.filter(n => n.type in registered && n.has_errors)
    .map(n => ({ type: n.type, values: (n.widgets || []).map(w => w.value) }));
  const broken = [];
  const links = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links || {});
  for (const link of links) {
    const from = graph.getNodeById(link.origin_id), to = graph.getNodeById(link.target_id);
    const out = from && from.outputs[link.origin_slot], inp = to && to.inputs[link.target_slot];
    if (!out || !inp) { broken.push(`link ${link.id}: missing end`); continue; }
    if (inp.link !== link.id) broken.push(`link ${link.id}: ${to.type}.${inp.name} holds link ${inp.link}`);
    if (!(out.links || []).includes(link.id)) broken.push(`link ${link.id}: not among ${from.type}.${out.name}'s links`);
    if (!window.LiteGraph.isValidConnection(out.type, inp.type))
      broken.push(`link ${link.id}: ${from.type}.${out.name} (${out.type}) -> ${to.type}.${inp.name} (${inp.type})`);
  }
  for (const node of nodes)
    for (const inp of node.inputs || [])
      if (inp.link != null && !links.some(l => l.id === inp.link))
        broken.push(`${node.type}.${inp.name} points at absent link ${inp.link}`);
  // as drawn: the frontend sizes a node to fit its title and widgets, whatever size the file gives
  window.app.canvas.draw(true, true);
  const rect = n => Array.from(n.getBounding(new Float32Array(4)));
  const overlaps = [];
  for (let i = 0; i < nodes.length; i++)
    for (let j = i + 1; j < nodes.length; j++) {
      const [a, b] = [rect(nodes[i]), rect(nodes[j])];
      if (a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3])
        overlaps.push(`${nodes[i].title} / ${nodes[j].title}`);
    }
  const groups = graph._groups || graph.groups || [];
  const outside = nodes.filter(n => !groups.some(g => {
    const [r, b] = [rect(n), g._bounding || g.bounding];
    return r[0] >= b[0] && r[1] >= b[1] && r[0] + r[2] <= b[0] + b[2] && r[1] + r[3] <= b[1] + b[3];
  })).map(n => n.title);
  return { nodeCount: nodes.length, linkCount: links.length, expectedNodes, expectedLinks, missing, flagged, broken,
           overlaps, outside, groups: groups.map(g => g.title) };
}

// Any dialog still over the canvas (the templates dialog where the setting did not take): Escape closes it.
async function closeDialogs(page) {
  for (let i = 0; i < 10 && await page.locator('.p-dialog-mask').count(); i++) {
    await page.keyboard.press('Escape');
    await page.waitForTimeout(300);
  }
}

// Zooms the canvas so every group of the loaded workflow is in view.
function fitGroups() {
  const canvas = window.app.canvas, groups = window.app.graph._groups || [];
  if (!groups.length) return;
  const b = groups.map(g => g._bounding || g.bounding);
  const x0 = Math.min(...b.map(r => r[0])), y0 = Math.min(...b.map(r => r[1]));
  const x1 = Math.max(...b.map(r => r[0] + r[2])), y1 = Math.max(...b.map(r => r[1] + r[3]));
  canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom: 0.8 });
  canvas.setDirty(true, true);
}

(async () => {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'qs-chromium-'));
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium', headless: true, viewport: { width: 1600, height: 1000 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--no-first-run'] });
  const result = { workflows: {}, pageErrors: [], console: [] };
  try {
    const page = browser.pages()[0] || await browser.newPage();
    page.on('pageerror', e => result.pageErrors.push(e.message));
    page.on('console', m => { if (m.type() === 'error') result.console.push(m.text()); });
    // a finished tutorial means no first-run templates dialog over the canvas (a setting of the test base's user)
    await page.request.post(`${URL}/settings/Comfy.TutorialCompleted`, { data: true });
    await page.goto(`${URL}/`, { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph &&
      Object.keys(window.LiteGraph.registered_node_types).length > 100, null, { timeout: 90000 });
    await page.waitForTimeout(1000);
    await closeDialogs(page);

    // node library: every Quickstep node's display name and category as the frontend registered them
    result.library = await page.evaluate(() => Object.fromEntries(
      Object.entries(window.LiteGraph.registered_node_types).filter(([name]) => name.startsWith('Quickstep'))
        .map(([name, cls]) => [name, { title: cls.title, category: cls.category,
                                       description: cls.nodeData && cls.nodeData.description }])));

    const template = async name =>
      (await page.request.get(`${URL}/api/workflow_templates/${PACK}/${encodeURIComponent(name)}.json`)).json();
    result.templates = await (await page.request.get(`${URL}/api/workflow_templates`)).json();
    for (const name of [...(result.templates[PACK] || [])].sort()) {
      const ui = await template(name);
      result.workflows[name] = await page.evaluate(async ([ui, name, inspect]) => {
        const inspectGraph = eval(`(${inspect})`);
        await window.app.loadGraphData(ui, true, true, name, { showMissingNodesDialog: false,
                                                               showMissingModelsDialog: false });
        const report = inspectGraph(ui.nodes.length, ui.links.length);
        report.prompt = (await window.app.graphToPrompt()).output;
        return report;
      }, [ui, name, inspectGraph.toString()]);
    }

    // queue one workflow from the UI, as a user would, and wait for its history entry
    const queued = process.env.QUEUE;
    const ui = await template(queued);
    await page.evaluate(async ([ui, name]) => {
      await window.app.loadGraphData(ui, true, true, name, { showMissingNodesDialog: false });
    }, [ui, queued]);
    const before = await (await page.request.get(`${URL}/history`)).json();
    await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
    let entry = null;
    for (let i = 0; i < 240 && !entry; i++) {
      await page.waitForTimeout(500);
      const history = await (await page.request.get(`${URL}/history`)).json();
      const fresh = Object.entries(history).filter(([id]) => !(id in before));
      if (fresh.length && fresh[0][1].status && fresh[0][1].status.completed !== undefined) entry = fresh[0][1];
    }
    result.queued = { name: queued, status: entry && entry.status,
                      outputs: entry ? Object.keys(entry.outputs || {}) : [] };
    await page.waitForTimeout(1000);   // let the canvas draw the saved image
    await closeDialogs(page);
    await page.evaluate(fitGroups);
    await page.waitForTimeout(500);
    await page.screenshot({ path: process.env.SCREENSHOT });
  } finally {
    fs.writeFileSync(process.env.RESULT, JSON.stringify(result, null, 1));
    await browser.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
})().catch(e => { console.error(e); process.exit(1); });
