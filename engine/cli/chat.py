"""chat, serve: talk to a model (here or through a running service), or serve it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from engine.cli.common import add_api_key, add_verb, api_key
from engine.core.errors import UserError


def register(sub) -> None:
    p = add_verb(sub, "chat", "chat with a model, optionally with a trained adapter",
                 "tunedeck chat ./internlm2-chat-1_8b --adapter work_dirs/my_recipe",
                 "tunedeck chat base --url http://127.0.0.1:8000 --prompt 'who are you?'",
                 "tunedeck chat ./llm --visual-encoder ./clip --llava work_dirs/llava_ft --image cat.jpg",
                 description="Chat at a >>> prompt (EXIT quits, RESET clears the history), or answer --prompt "
                             "once. The answer streams as it is generated.")
    p.add_argument("model", help="the base model's folder or hub id (with --url: a served name, base or an adapter)")
    p.add_argument("--adapter", help="a checkpoint, or a run directory (its latest checkpoint)")
    p.add_argument("--template", help="prompt template (default: what the run used, else detected)")
    p.add_argument("--system", help="system prompt (default: what the run used)")
    p.add_argument("--bits", type=int, choices=(4, 8), help="load the base in 4 or 8 bits")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the most likely tokens up to this probability mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeating tokens")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow the model folder's own Python code to run (InternLM2 needs none)")
    p.add_argument("--url", help="talk to a running `tunedeck serve` at this address instead of loading a model")
    add_api_key(p, "bearer token for --url")
    p.add_argument("--visual-encoder", help="LLaVA: the CLIP vision model's folder")
    p.add_argument("--llava", help="LLaVA: a pretrain or finetune checkpoint (or run) directory")
    p.add_argument("--image", help="LLaVA: the image the conversation is about")
    p.set_defaults(verb_handler=chat)

    p = add_verb(sub, "serve", "serve one base model and many adapters: OpenAI-compatible API and a web chat",
                 "tunedeck serve ./internlm2-chat-1_8b --adapter mine=work_dirs/my_recipe",
                 "tunedeck serve ./llm --visual-encoder ./clip --llava ft=work_dirs/llava_ft --port 8001",
                 description="Serve a base model and its adapters behind an OpenAI-compatible API (/v1) with a "
                             "web chat at /. Binds to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("model", help="the base model's folder or hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a checkpoint or run directory as NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 opens it to the network")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    add_api_key(p, "require this bearer token")
    p.add_argument("--bits", type=int, choices=(4, 8), help="load the base in 4 or 8 bits")
    p.add_argument("--template", help="prompt template of the base (adapters bring their own)")
    p.add_argument("--system", help="system prompt of the base")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own Python code to run (InternLM2 needs none)")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the GPU decode step at start")
    p.add_argument("--max-request-mb", type=float, default=32.0,
                   help="largest request body accepted, in MiB (413 past it)")
    p.add_argument("--visual-encoder", help="LLaVA: the CLIP vision model's folder")
    p.add_argument("--llava", action="append", default=[], metavar="NAME=DIR",
                   help="LLaVA: serve a pretrain or finetune checkpoint as NAME (repeatable; images as "
                        "image_url parts)")
    p.set_defaults(verb_handler=serve)


def chat(args) -> int:
    from engine.serve.generation import GenerationParams

    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    problems = params.validate()
    if problems:
        raise UserError(*[f"--{p.replace('_', '-')}" for p in problems])
    if args.llava or args.visual_encoder or args.image:
        from engine.llava.chat import LlavaChatSession

        session = LlavaChatSession(args.model, args.visual_encoder, args.llava, args.image, bits=args.bits,
                                   template=args.template, system=args.system,
                                   max_new_tokens=params.max_new_tokens,
                                   trust_remote_code=bool(args.trust_remote_code))
        source = f"{args.llava} about {args.image or 'no image'}"
    elif args.url:
        from engine.serve.chat import RemoteChatSession

        session = RemoteChatSession(args.url, args.model, params, api_key=api_key(args), system=args.system)
        source = f"{args.model} at {args.url}"
    else:
        from engine.serve.chat import ChatSession, load_for_chat

        loaded = load_for_chat(args.model, args.adapter, template=args.template, system=args.system,
                               bits=args.bits, trust_remote_code=args.trust_remote_code)
        session = ChatSession(loaded, params)
        source = f"{loaded.source} (template {loaded.template})"
    return converse(args.prompt, f"chatting with {source}", session.ask, session.reset)


def converse(once: str | None, greeting: str, ask: Callable[[str], Iterable[str]], reset: Callable[[], None]) -> int:
    """Answer ``once`` and return, or chat at a >>> prompt until EXIT or end of input (RESET clears the
    history); ``ask`` yields the answer's pieces as they come."""
    def say(prompt: str) -> None:
        for piece in ask(prompt):
            print(piece, end="", flush=True)
        print()

    if once is not None:
        say(once)
        return 0
    print(f"{greeting}; EXIT quits, RESET clears history", file=sys.stderr)
    while True:
        try:
            prompt = input(">>> ")
        except EOFError:
            print()
            return 0
        if prompt.strip() == "EXIT":
            return 0
        if prompt.strip() == "RESET":
            reset()
            print("(history cleared)")
            continue
        if prompt.strip():
            say(prompt)


def serve(args) -> int:
    from engine.serve.scheduler import parse_adapter_args
    from engine.workflow.serve import serve

    return serve(args.model, adapters=parse_adapter_args(args.adapter), host=args.host, port=args.port,
                 api_key=api_key(args), bits=args.bits, template=args.template, system=args.system,
                 trust_remote_code=args.trust_remote_code, warmup=not args.no_warmup,
                 log=lambda m: print(m, file=sys.stderr, flush=True), visual_encoder=args.visual_encoder,
                 llavas=parse_adapter_args(args.llava), max_request_mb=args.max_request_mb)
