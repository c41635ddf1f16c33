// Train gfcompile's portable artifacts from Node.js with onnxruntime-node: proof that train_step.onnx
// is a plain ONNX function that any onnxruntime runs, with no Python and no training build.
//
//   node scripts/node_train_step.mjs ARTIFACTS BATCHES.safetensors OUT.safetensors [--modules DIR]
//
// BATCHES holds x0, y0, x1, y1, ... (one step each); OUT receives "loss" (one value per step) and
// every trainable parameter after the last step, under its name. The initial state comes from the
// artifacts' portable checkpoint; names, files and hyper-parameters from manifest.json ("portable").
// --modules: the folder whose node_modules holds onnxruntime-node (default: this script's folder).

import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";

const DTYPES = {
  F32: [Float32Array, "float32"],
  I64: [BigInt64Array, "int64"],
  I32: [Int32Array, "int32"],
  U8: [Uint8Array, "uint8"],
};

function readSafetensors(path) {
  const raw = readFileSync(path);
  const headerLength = Number(raw.readBigUInt64LE(0));
  const header = JSON.parse(raw.subarray(8, 8 + headerLength).toString("utf8"));
  const body = raw.subarray(8 + headerLength);
  const tensors = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [begin, end] = entry.data_offsets;
    const [ArrayType, type] = DTYPES[entry.dtype];
    // Copy into an aligned buffer: typed arrays need offsets that are multiples of their element size.
    const bytes = new Uint8Array(body.subarray(begin, end));
    tensors[name] = { type, dims: entry.shape, data: new ArrayType(bytes.buffer, 0, (end - begin) / ArrayType.BYTES_PER_ELEMENT) };
  }
  return { tensors, metadata: header.__metadata__ ?? {} };
}

function writeSafetensors(path, tensors) {
  const header = {};
  const blobs = [];
  let offset = 0;
  for (const [name, { dims, data }] of Object.entries(tensors)) {
    const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    header[name] = { dtype: "F32", shape: dims, data_offsets: [offset, offset + bytes.length] };
    offset += bytes.length;
    blobs.push(bytes);
  }
  let encoded = Buffer.from(JSON.stringify(header), "utf8");
  encoded = Buffer.concat([encoded, Buffer.alloc((8 - (encoded.length % 8)) % 8, " ")]);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(encoded.length));
  writeFileSync(path, Buffer.concat([length, encoded, ...blobs]));
}

async function main() {
  const args = process.argv.slice(2);
  const modulesAt = args.includes("--modules") ? args.splice(args.indexOf("--modules"), 2)[1] : import.meta.dirname;
  const [artifacts, batchesPath, outPath] = args;
  if (!outPath) {
    console.error("usage: node_train_step.mjs ARTIFACTS BATCHES.safetensors OUT.safetensors [--modules DIR]");
    process.exit(2);
  }
  const ort = createRequire(join(resolve(modulesAt), "package.json"))("onnxruntime-node");
  const manifest = JSON.parse(readFileSync(join(artifacts, "manifest.json"), "utf8"));
  const spec = manifest.portable;
  const options = manifest.session_options ?? {};
  const session = await ort.InferenceSession.create(join(artifacts, spec.train_step), {
    executionProviders: ["cpu"],
    enableCpuMemArena: options.enable_cpu_mem_arena ?? true,
    enableMemPattern: options.enable_mem_pattern ?? true,
  });

  const state = {};
  for (const [name, t] of Object.entries(readSafetensors(join(artifacts, spec.checkpoint)).tensors)) {
    state[name] = new ort.Tensor(t.type, t.data, t.dims);
  }
  // The initial checkpoint holds parameters only: optimizer state starts at zero. A group's state has
  // its one tensor's shape, or is flat over its tensors laid end to end.
  const optimizerState = spec.groups.flatMap((group) => group.state);
  for (const group of spec.groups) {
    const dims = group.parameters.length === 1 ? state[group.parameters[0]].dims
      : [group.parameters.reduce((sum, p) => sum + state[p].dims.reduce((a, b) => a * b, 1), 0)];
    const size = dims.reduce((a, b) => a * b, 1);
    for (const s of group.state) state[s.input] ??= new ort.Tensor("float32", new Float32Array(size), dims);
  }
  const { tensors: batches } = readSafetensors(batchesPath);
  const steps = Object.keys(batches).filter((name) => name.startsWith("x")).length;
  const lr = new ort.Tensor("float32", Float32Array.of(manifest.optimizer.lr), []);
  const losses = new Float32Array(steps);
  for (let step = 0; step < steps; step++) {
    const x = batches[`x${step}`];
    const y = batches[`y${step}`];
    const feeds = {
      [spec.data_inputs[0]]: new ort.Tensor(x.type, x.data, x.dims),
      [spec.label_input]: new ort.Tensor(y.type, y.data, y.dims),
      [spec.step_input]: new ort.Tensor("int64", BigInt64Array.of(BigInt(step)), []),
      [spec.lr_input]: lr,
    };
    for (const parameter of spec.parameters) feeds[parameter.input] = state[parameter.input];
    for (const s of optimizerState) feeds[s.input] = state[s.input];
    const results = await session.run(feeds);
    losses[step] = results[spec.loss_output].data[0];
    for (const parameter of spec.parameters) state[parameter.input] = results[parameter.output];
    for (const s of optimizerState) state[s.input] = results[s.output];
  }
  const out = { loss: { dims: [steps], data: losses } };
  for (const parameter of spec.parameters) {
    const tensor = state[parameter.input];
    out[parameter.name] = { dims: tensor.dims, data: tensor.data };
  }
  writeSafetensors(outPath, out);
  console.log(`trained ${steps} steps with onnxruntime-node ${ort.env.versions?.common ?? ""}; losses ${Array.from(losses).join(" ")}`);
}

main().catch((error) => {
  console.error(`node_train_step: error: ${error.message ?? error}`);
  process.exit(2);
});
